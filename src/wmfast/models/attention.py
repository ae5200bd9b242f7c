"""Self-attention with RoPE on queries and keys (positional type "rotary_qk").

``RotarySelfAttention`` is an ``nn.MultiheadAttention`` subclass, so it keeps
the parameter names ``in_proj_weight``, ``in_proj_bias`` and ``out_proj`` (a
rotary_qk checkpoint differs from the others only in pos_encoder buffers). It
projects q, k, v, calls its submodule ``rotary`` (nnsight path
``...self_attn.rotary``, output: the rotated ``(q, k)``) and attends causally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wmfast import functional as WF
from wmfast.backends import resolve_rotary


class QKRotary(nn.Module):
    """Applies RoPE to (q, k) given the (cos, sin) tables of pos_encoder.

    ``rotary_impl`` is "torch" on reference models; fast models set it to their
    rotary option, and the Triton kernel then runs where wmfast.backends picks
    it. Either way the output is new tensors: a saved input of this module
    never changes afterwards.
    """

    rotary_impl = "torch"

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q, k: (B, T, H, D); cos, sin: (B, T, D/2) fp32
        if resolve_rotary(self.rotary_impl, q.device, q.dtype) == "triton":
            from wmfast.ops.rotary import rotary_qk

            return rotary_qk(q, k, cos, sin)
        return WF.rotary_qk(q, k, cos, sin)


class RotarySelfAttention(nn.MultiheadAttention):
    """Causal self-attention with RoPE; returns ``(attn_output, None)`` like MHA."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, **factory) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, batch_first=True, **factory)
        self.rotary = QKRotary()

    @classmethod
    def adopt(cls, mha: nn.MultiheadAttention) -> RotarySelfAttention:
        """A RotarySelfAttention holding ``mha``'s own parameters (shared, not copied).

        Built on the meta device so that constructing it draws nothing from the
        RNG: a seeded rotary_qk model then starts from the same weights as the
        other positional types for that seed.
        """
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, device="meta")
        new.in_proj_weight = mha.in_proj_weight
        new.in_proj_bias = mha.in_proj_bias
        new.out_proj = mha.out_proj
        return new

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, None]:
        batch, seq_len, d_model = x.shape
        heads = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, seq_len, 3, heads, d_model // heads).unbind(2)  # (B,T,H,D)
        cos, sin = rope
        q, k = self.rotary(q, k, cos, sin)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
        )  # (B, H, T, D)
        out = attn.transpose(1, 2).reshape(batch, seq_len, d_model)
        return self.out_proj(out), None
