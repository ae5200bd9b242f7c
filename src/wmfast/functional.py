"""Rotary math in pure PyTorch: the reference every rotary kernel is checked against.

Two different rotations share these helpers:

* workingmem's ``"rotary"`` positional type rotates the whole (scaled) embedding
  vector over d_model and *adds* the result to it (``embedding_rotation``);
* ``"rotary_qk"`` is RoFormer RoPE on each attention head's queries and keys
  (``rotary_qk``).

Both use the rotate_half pairing: element i is paired with i + dim/2, and angle
j rotates the pair (j, j + dim/2). Angles are always fp32 (positions * inv_freq).
"""

from __future__ import annotations

import torch

ROTARY_BASE = 10000.0


def rotary_inv_freq(dim: int, base: float = ROTARY_BASE) -> torch.Tensor:
    """inv_freq for a rotation over ``dim`` features: (dim // 2,) fp32.

    workingmem writes ``1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))``
    (``base ** (-2j/dim)`` is equal algebraically but differs by an ulp). Its fp32
    ``pow`` is not correctly rounded, and PyTorch's vectorised CPU pow differs by
    an ulp from the scalar powf at some widths (measured: d_model=48, element 10,
    on an AVX2 machine), so the same line gives machine-dependent buffers. We
    take the power in fp64 and round it once to fp32, then divide in fp32 as
    workingmem does: the correctly rounded value, identical on every machine and
    device, and bitwise equal to workingmem's golden buffers.
    """
    exponent = torch.arange(0, dim, 2).float() / dim  # fp32, as workingmem computes it
    power = (base ** exponent.double()).float()
    return 1.0 / power


def rotary_angles(seq_len: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Angles ``t * inv_freq`` for positions 0..seq_len-1: (seq_len, dim // 2) fp32."""
    positions = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
    return torch.outer(positions, inv_freq.float())


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim, x1/x2 its two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_tables(seq_len: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the angles for positions 0..seq_len-1: each (T, dim // 2) fp32."""
    angles = rotary_angles(seq_len, inv_freq)
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (j, j + D/2) of x's last dim by the angle whose cos/sin is
    at index j: the one rotation both rotary types apply. The math runs in fp32,
    or in x's dtype where that is wider (an fp64 model keeps fp64 precision;
    its tables stay fp32 angles, as in every dtype); x's dtype out.

    cos, sin: (..., D/2) fp32, broadcastable against x's leading dims.
    """
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def embedding_rotation(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """workingmem's "rotary" term: ``x*cos + rotate_half(x)*sin`` over d_model.

    x: (B, T, d_model). Returns the rotation term only; the model adds it to x
    (so position 0, whose angle is 0, comes out as 2x). Equal to workingmem's
    ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)``, written per pair.
    """
    cos, sin = rotary_tables(x.shape[-2], inv_freq)  # (T, d/2)
    return rotate_pairs(x, cos, sin)


def rotary_qk_tables(
    batch: int, seq_len: int, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for rotary_qk: each (B, T, head_dim // 2) fp32.

    Materialised with a real batch dimension (not an ``expand`` view) so that an
    nnsight edit of one invoke's slice cannot leak into another invoke.
    """
    cos, sin = rotary_tables(seq_len, inv_freq)  # (T, D/2)
    return cos.repeat(batch, 1, 1), sin.repeat(batch, 1, 1)


def rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on queries and keys: the pure-torch reference.

    q, k: (B, T, H, D), any strides (e.g. views into the packed projection).
    cos, sin: (B, T, D/2) fp32; a batch stride of 0 (a broadcast table) is fine.
    Returns new tensors (B, T, H, D) in the input dtype; math is fp32 (fp64 for fp64).
    """
    c = cos.unsqueeze(-2)  # (B, T, 1, D/2): the same angle for every head
    s = sin.unsqueeze(-2)
    return rotate_pairs(q, c, s), rotate_pairs(k, c, s)
