"""Attention patterns: each layer's attention weights, softmax(q k^T / sqrt(D))
under the causal mask.

The models never materialise them: attention runs fused (SDPA), and the
encoder layers call ``self_attn`` with ``need_weights=False``, so neither a
forward nor an nnsight trace can read them ("rotary_qk"'s ``self_attn``
returns ``(output, None)`` likewise). Two ways to get them:

* ``attention_patterns(model, input_ids)``: every layer's pattern for a
  batch, from the model's current weights (reference or fast, any positional
  type), as the model computes in eval mode.
* ``attention_pattern(q, k)``: the pattern from queries and keys you hold,
  e.g. the rotated ``(q, k)`` an nnsight trace saved at
  ``transformer_encoder.layers[i].self_attn.rotary`` ("rotary_qk"), edits
  included.

Patterns are fp32 whatever the model's dtype, and differentiable.
"""

from __future__ import annotations

import math

import torch

from wmfast.attention_backends import sdpa_causal
from wmfast.interp import unwrap
from wmfast.models.inputs import check_input_ids
from wmfast.models.transformer import TransformerModel
from wmfast.models.transformer_functional import (
    fast_path_mismatch,
    gather_weights,
    statics_of,
    transformer_forward,
)


def attention_pattern(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) fp32 causal attention weights from q, k (B, T, H, D); each
    row sums to 1 and is 0 above the diagonal."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(
            "q and k must both be (batch, seq_len, n_heads, head_dim); got "
            f"{tuple(q.shape)} and {tuple(k.shape)}"
        )
    seq_len, head_dim = q.shape[1], q.shape[-1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(head_dim)
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def attention_patterns(model: TransformerModel, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention pattern for ``input_ids`` (B, T), in layer order:
    a list of n_layers (B, n_heads, T, T) fp32 tensors.

    Computed as the model runs in eval mode (no dropout), whatever mode it is
    in, and under the caller's grad mode. ``model`` may be wrapped by nnsight
    (``wmfast.interp.NNsight(model)``).
    """
    model = unwrap(model)
    if not isinstance(model, TransformerModel):
        raise TypeError(
            f"attention_patterns takes a wmfast transformer model; got {type(model).__name__} "
            "(RNN/LSTM models have no attention)"
        )
    check_input_ids(input_ids, model.d_vocab, model.n_ctx_limit, model.check_token_ids)
    mismatch = fast_path_mismatch(model)
    if mismatch is not None:
        raise ValueError(
            f"attention_patterns computes the built layers' math from the weights, but "
            f"{mismatch}; take q and k from an nnsight trace instead and call "
            f"attention_pattern(q, k)"
        )
    patterns: list[torch.Tensor] = []

    def attend(q, k, v, dropout_p):
        patterns.append(attention_pattern(q, k))
        return sdpa_causal(q, k, v, dropout_p)

    statics = statics_of(model)._replace(training=False)
    # ``record`` keeps the reference's feature order and out-of-place ops
    transformer_forward(
        gather_weights(model), input_ids, statics, attend=attend, record=lambda path, value: None
    )
    return patterns
