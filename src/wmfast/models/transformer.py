"""The workingmem Transformer (nn.TransformerEncoder port), reference variant.

Module paths are part of the contract (nnsight paths, state_dict keys)::

    embedding            nn.Embedding(d_vocab, d_model)
    pos_encoder          None | LearnedPositionalEmbedding | RotaryEmbeddingRotation
                         | RotaryQKTables
    transformer_encoder  nn.TransformerEncoder (RotaryTransformerEncoder for rotary_qk)
      .layers[i]         nn.TransformerEncoderLayer (RotaryEncoderLayer for rotary_qk)
        .self_attn       nn.MultiheadAttention (RotarySelfAttention, with .rotary)
        .linear1 .linear2 .norm1 .norm2 .dropout .dropout1 .dropout2
    output_layer         nn.Linear(d_model, d_vocab)
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from wmfast.config import ModelConfig
from wmfast.models.attention import RotarySelfAttention
from wmfast.models.base import WorkingMemoryModel
from wmfast.models.positional import (
    LearnedPositionalEmbedding,
    RotaryEmbeddingRotation,
    RotaryQKTables,
)

Rope = tuple[torch.Tensor, torch.Tensor]


class RotaryEncoderLayer(nn.TransformerEncoderLayer):
    """A post-LN encoder layer whose self-attention applies RoPE to q and k.

    Its forward is written out instead of inherited: the inherited one takes
    PyTorch's fused "fast path" in eval + no_grad, which never calls
    ``self_attn`` and would silently drop RoPE (measured: 0.93 max error).
    """

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str
    ) -> None:
        super().__init__(
            d_model,
            nhead,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation=activation,
            batch_first=True,
            norm_first=False,
        )
        # same parameters, drawn from the RNG exactly as the plain layer draws them
        self.self_attn = RotarySelfAttention.adopt(self.self_attn)

    def forward(  # type: ignore[override]
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        if rope is None:
            raise ValueError("RotaryEncoderLayer needs rope=(cos, sin) from pos_encoder")
        if src_mask is not None or src_key_padding_mask is not None or not is_causal:
            raise ValueError("RotaryEncoderLayer is causal-only: pass no masks")
        x = src
        x = self.norm1(x + self.dropout1(self.self_attn(x, rope)[0]))
        x = self.norm2(
            x + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        )
        return x


class RotaryTransformerEncoder(nn.TransformerEncoder):
    """nn.TransformerEncoder that hands the rope tables to every layer."""

    def __init__(self, encoder_layer: RotaryEncoderLayer, num_layers: int) -> None:
        super().__init__(encoder_layer, num_layers, enable_nested_tensor=False)

    def forward(  # type: ignore[override]
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = True,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, rope=rope)
        return x


def _make_pos_encoder(config: ModelConfig) -> nn.Module | None:
    kind = config.positional_embedding_type
    if kind == "standard":
        return LearnedPositionalEmbedding(config.n_ctx, config.d_model)
    if kind == "rotary":
        return RotaryEmbeddingRotation(config.d_model)
    if kind == "rotary_qk":
        return RotaryQKTables(config.head_dim)
    return None


def xavier_init_(module: nn.Module) -> None:
    """workingmem's init: xavier_uniform_ on every parameter with 2+ dims, in
    registration order (the order decides which random numbers each one gets)."""
    for param in module.parameters():
        if param.dim() > 1:
            nn.init.xavier_uniform_(param)


class TransformerModel(WorkingMemoryModel):
    """forward(input_ids (B, T) int) -> logits (B, T, d_vocab).

    A reference model has ``_fast = None``; a fast model (wmfast.fast) holds a
    runner there that computes the same function when no nnsight trace is active
    (see WorkingMemoryModel).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d_vocab = self._keep_config(config)
        self.d_model = config.d_model
        self.positional_embedding_type = config.positional_embedding_type
        with warnings.catch_warnings():
            # d_mlp=0 is legal (Linear(d, 0)); PyTorch warns that initialising it is a no-op
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            # construction order = RNG draw order = workingmem's order; do not reorder
            self.embedding = nn.Embedding(d_vocab, config.d_model)
            self.pos_encoder = _make_pos_encoder(config)
            self.transformer_encoder = self._make_encoder(config)
            self.output_layer = nn.Linear(config.d_model, d_vocab)
            xavier_init_(self)

    @staticmethod
    def _make_encoder(config: ModelConfig) -> nn.TransformerEncoder:
        # ONE layer that nn.TransformerEncoder deep-copies n_layers times
        layer_args = dict(
            dim_feedforward=config.d_mlp, dropout=config.dropout, activation=config.act_fn
        )
        if config.positional_embedding_type == "rotary_qk":
            layer = RotaryEncoderLayer(config.d_model, config.n_heads, **layer_args)
            return RotaryTransformerEncoder(layer, config.n_layers)
        layer = nn.TransformerEncoderLayer(
            config.d_model, config.n_heads, batch_first=True, norm_first=False, **layer_args
        )
        # no padding masks are ever passed, so nested tensors would never be used
        return nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)

    @property
    def n_ctx_limit(self) -> int | None:
        """The sequence-length limit, or None (only learned positions have one)."""
        return self.config.n_ctx if self.positional_embedding_type == "standard" else None

    def forward_modules(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The path through every documented submodule (what nnsight traces)."""
        x = self.embedding(input_ids) * math.sqrt(self.d_model)  # (B, T, d)
        kind = self.positional_embedding_type
        if kind in ("standard", "rotary"):
            x = x + self.pos_encoder(x)
        if kind == "rotary_qk":
            rope = self.pos_encoder(x)  # (cos, sin), each (B, T, head_dim/2)
            x = self.transformer_encoder(x, rope=rope)
        else:
            seq_len = x.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(
                seq_len, device=x.device, dtype=x.dtype
            )
            x = self.transformer_encoder(x, mask=mask, is_causal=True)
        return self.output_layer(x)  # (B, T, d_vocab)
