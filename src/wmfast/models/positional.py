"""The ``pos_encoder`` modules, one per positional_embedding_type.

=============  =========================  ======================================
type           module                     pos_encoder(x) returns
=============  =========================  ======================================
"standard"     LearnedPositionalEmbedding rows 0..T-1 of ``pos_embedding``, (B, T, d)
"rotary"       RotaryEmbeddingRotation    x*cos + rotate_half(x)*sin, (B, T, d)
"rotary_qk"    RotaryQKTables             (cos, sin), each (B, T, head_dim/2) fp32
None           (pos_encoder is None)
=============  =========================  ======================================
"""

from __future__ import annotations

import torch
from torch import nn

from wmfast import functional as WF
from wmfast.backends import resolve_rotary


class LearnedPositionalEmbedding(nn.Module):
    """ "standard": a learned table of n_ctx positions."""

    learnable = True  # workingmem's flag (its other, sinusoidal, form is never built)

    def __init__(self, n_ctx: int, d_model: int) -> None:
        super().__init__()
        self.n_ctx = n_ctx
        self.pos_embedding = nn.Embedding(n_ctx, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len = x.shape[0], x.shape[1]
        if seq_len > self.n_ctx:
            raise ValueError(
                f"sequence length {seq_len} exceeds n_ctx={self.n_ctx}, the number of "
                f"learned positions of positional_embedding_type='standard'"
            )
        # index with a (B, T) grid so the output is a real (B, T, d) tensor with
        # its own batch rows, never an expand() view (nnsight edits per invoke)
        positions = torch.arange(seq_len, device=x.device).expand(batch, seq_len)
        return self.pos_embedding(positions)


class _FP32InvFreq(nn.Module):
    """Holds the persistent fp32 ``inv_freq`` buffer and keeps it fp32.

    ``model.to(torch.bfloat16)`` casts every floating buffer; angles computed
    from a bf16 inv_freq would be wrong by up to ~0.4% per position, so the
    buffer keeps its fp32 values and only follows device moves.
    """

    inv_freq: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim, self.base = dim, WF.ROTARY_BASE  # as workingmem's module names them
        self.register_buffer("inv_freq", WF.rotary_inv_freq(dim), persistent=True)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if inv_freq.is_meta:
            # built on the meta device: there are no values to keep (after
            # to_empty, load_state_dict fills them), only the dtype
            self.inv_freq = self.inv_freq.to(torch.float32)
        else:
            self.inv_freq = inv_freq.to(device=self.inv_freq.device, dtype=torch.float32)
        return self


class RotaryEmbeddingRotation(_FP32InvFreq):
    """ "rotary" (workingmem's meaning): rotates the whole embedding vector.

    Not attention RoPE: pos_encoder(x) is the rotation term, which the model
    adds to x. Angles are recomputed from inv_freq on every call (workingmem
    caches cos/sin per sequence length only, which goes stale after a device
    move; we do not copy that). ``rotary_impl``: as on QKRotary.
    """

    rotary_impl = "torch"
    rotate_half = staticmethod(WF.rotate_half)  # workingmem's module has it as a method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolve_rotary(self.rotary_impl, x.device, x.dtype) == "triton":
            from wmfast.ops.rotary import embedding_rotation

            cos, sin = WF.rotary_tables(x.shape[1], self.inv_freq)
            return embedding_rotation(x, cos, sin, add_input=False)
        return WF.embedding_rotation(x, self.inv_freq)


class RotaryQKTables(_FP32InvFreq):
    """ "rotary_qk": produces the (cos, sin) tables that every attention layer uses.

    Runs once per forward; its output is what an nnsight edit of
    ``pos_encoder.output`` changes, and every layer's rotation follows it.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return WF.rotary_qk_tables(x.shape[0], x.shape[1], self.inv_freq)
