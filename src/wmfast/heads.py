"""Zero-ablating attention heads: head h of layer l adds nothing to its
layer's attention output.

The models run attention fused inside ``self_attn`` (nn.MultiheadAttention,
or "rotary_qk"'s subclass of it), so no submodule sees one head: neither a
hook nor an nnsight ``.output`` reaches a head's output z_h, and nnsight
0.8's recursive ``.source`` cannot enter ``F.multi_head_attention_forward``
(a KeyError inside nnsight, on the reference as on the fast model). The
weight that reads z_h can be reached: ``self_attn``'s output is
``out_proj.weight @ concat(z_1, ..., z_H) + out_proj.bias``, so zeroing head
h's columns of ``out_proj.weight`` removes exactly z_h's term. Both variants
read the weights at every call, traced or not, so they give the same
ablated numbers.

Gradients are those of the ablated model: nothing flows back into head h's
queries, keys and values (the zeroed columns pass none), and a tensor hook
zeroes the gradient of the zeroed columns themselves (d output / d W[:, h]
is z_h, which the ablation sets to 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from wmfast.interp import unwrap
from wmfast.models.transformer import TransformerModel


def _head_columns(
    model: TransformerModel, heads: Iterable[tuple[int, int]]
) -> dict[int, torch.Tensor]:
    """{layer: bool mask over out_proj's input columns} for (layer, head) pairs,
    each checked against the model's layers and heads."""
    layers = model.transformer_encoder.layers
    masks: dict[int, torch.Tensor] = {}
    for pair in heads:
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise TypeError(f"heads must be (layer, head) pairs; got {pair!r}")
        layer, head = pair
        if not (isinstance(layer, int) and 0 <= layer < len(layers)):
            raise ValueError(f"layer must be an int in [0, {len(layers)}); got {layer!r}")
        attention = layers[layer].self_attn
        n_heads, d_model = attention.num_heads, attention.embed_dim
        if not (isinstance(head, int) and 0 <= head < n_heads):
            raise ValueError(f"head must be an int in [0, n_heads={n_heads}); got {head!r}")
        head_dim = d_model // n_heads
        weight = attention.out_proj.weight
        mask = masks.setdefault(layer, torch.zeros(d_model, dtype=torch.bool, device=weight.device))
        mask[head * head_dim : (head + 1) * head_dim] = True
    return masks


@contextlib.contextmanager
def ablate_heads(model, heads: Iterable[tuple[int, int]]) -> Iterator[None]:
    """Zero-ablate attention heads while the block runs, then restore the weights.

    ``heads``: (layer, head) pairs, e.g. ``[(0, 1)]`` for head 1 of layer 0.
    ``model``: a wmfast transformer, reference or fast (or nnsight-wrapped).
    The ablation edits ``out_proj.weight`` in place, so it applies to every
    call inside the block and to every model sharing that weight (a model
    and its ``make_fast`` copy). In an nnsight trace it covers the whole
    trace: run the clean and the ablated inputs as two traces.
    """
    model = unwrap(model)
    if not isinstance(model, TransformerModel):
        raise TypeError(
            f"ablate_heads takes a wmfast transformer model; got {type(model).__name__} "
            "(RNN/LSTM models have no attention heads)"
        )
    masks = _head_columns(model, heads)  # every pair checked before any edit
    layers = model.transformer_encoder.layers
    saved, handles = [], []
    try:
        with torch.no_grad():
            for layer, mask in masks.items():
                weight = layers[layer].self_attn.out_proj.weight
                saved.append((weight, mask, weight[:, mask].clone()))
                weight[:, mask] = 0
                if weight.requires_grad:
                    handles.append(weight.register_hook(lambda g, m=mask: g.masked_fill(m, 0)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for weight, mask, values in reversed(saved):
                weight[:, mask] = values
