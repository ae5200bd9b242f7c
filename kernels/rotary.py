"""Triton kernels for the two rotary ops, and their host launchers.

Both kernels rotate pairs (j, j + D/2) of a row by angles given as cos/sin
tables (not recomputed from positions: an nnsight edit of the tables must reach
the kernel, and torch's cos/sin are what the reference uses). Math is fp32 in
registers; storage is fp32, fp16 or bf16. ``CONJ`` rotates by the negative
angle, which is the backward of a rotation.

* ``_rotary_qk_kernel``: RoPE on q and k of every head in ONE launch; one
  program per (batch, position) row and block of heads, so each program reads
  its cos/sin row once for all heads of both q and k. q and k are read through
  strides (views into the packed (B, T, 3, H, D) projection need no copy) and
  written to any output, which may be the input itself (in place).
* ``_rotary_qk_packed_grad_kernel``: rotary_qk's backward for q and k that
  came from one packed (B, T, 3, H, D) projection: writes the projection's
  gradient whole (q's and k's rotated back, v's copied), so autograd need
  not stack three gradients afterwards.
* ``_embedding_rotation_kernel``: workingmem's "rotary", fused with the
  sqrt(d_model) scale and the residual add:
  ``s = x * scale; out = s + s*cos + rotate_half(s)*sin`` (``ADD_INPUT``), or
  the rotation term alone.

The launchers take ``wrap``: identity for direct launches, or
``torch.library.wrap_triton`` inside a ``triton_op`` so torch.compile can trace
the launch. The sequence length is not specialised, so a new length does not
compile a new kernel. The strides are, as Triton does by default (equal to 1,
divisible by 16): that is how the compiler knows a row starts 16-byte aligned
and loads it with vector instructions. On an H100 at the SIR shape (bf16) an
eager forward call took 0.61 ms with unspecialised batch strides and 0.51 ms
with them specialised, and the kernel alone then moves its bytes at 96% of the
copy bandwidth (tools/rotary_tune.py). A new length changes the strides'
divisibility at most once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from wmfast.kernels._triton import (
    cdiv,
    check_device,
    check_dtype,
    fp32,
    next_power_of_2,
    no_wrap,
    tl,
    triton,
)

MAX_HEAD_DIM = 256
TableStrides = tuple[int, int, int]  # a cos/sin table's (batch, position, feature) strides


@triton.jit
def _row_position(seq_len):
    """(b, t) of this program's row b * seq_len + t, in int64: b * stride
    overflows int32 on large batches of long sequences."""
    row = tl.program_id(0)
    return (row // seq_len).to(tl.int64), (row % seq_len).to(tl.int64)


@triton.jit
def _load_angles(cos_row, sin_row, j, c_sd, s_sd, mask, CONJ: tl.constexpr):
    """One row of the cos/sin tables in fp32; the negative angle when CONJ (backward)."""
    cos = tl.load(cos_row + j * c_sd, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_row + j * s_sd, mask=mask, other=0.0).to(tl.float32)
    if CONJ:
        sin = -sin
    return cos, sin


@triton.jit
def _heads_tile(seq_len, n_heads, cos_ptr, sin_ptr, c_sb, c_st, c_sd, s_sb, s_st, s_sd,
                HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                CONJ: tl.constexpr):  # fmt: skip
    """This program's (b, t), block of heads h (BLOCK_H, 1) and pairs j, the
    (BLOCK_H, BLOCK_HALF) mask, and the row's angles as (1, BLOCK_HALF) fp32."""
    b, t = _row_position(seq_len)
    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < HALF
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (h < n_heads)[:, None] & j_ok[None, :]
    cos, sin = _load_angles(
        cos_ptr + b * c_sb + t * c_st, sin_ptr + b * s_sb + t * s_st, j, c_sd, s_sd, j_ok, CONJ
    )
    return b, t, h, j, mask, cos[None, :], sin[None, :]


@triton.jit
def _rotate_pairs(src, dst, src_half, dst_half, cos, sin, mask):
    """Rotate the pairs (x1 at src, x2 at src + src_half) by (cos, sin) into dst; fp32 math."""
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + src_half, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + dst_half, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seq_len"])
def _rotary_qk_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    seq_len, n_heads,
    q_sb, q_st, q_sh, q_sd,
    k_sb, k_st, k_sh, k_sd,
    qo_sb, qo_st, qo_sh, qo_sd,
    ko_sb, ko_st, ko_sh, ko_sd,
    c_sb, c_st, c_sd,
    s_sb, s_st, s_sd,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, CONJ: tl.constexpr,
):  # fmt: skip
    b, t, h, j, mask, cos, sin = _heads_tile(
        seq_len, n_heads, cos_ptr, sin_ptr, c_sb, c_st, c_sd, s_sb, s_st, s_sd,
        HALF, BLOCK_HALF, BLOCK_H, CONJ,
    )  # fmt: skip

    # queries, then keys: the same angles
    src = q_ptr + b * q_sb + t * q_st + h[:, None] * q_sh + j[None, :] * q_sd
    dst = qo_ptr + b * qo_sb + t * qo_st + h[:, None] * qo_sh + j[None, :] * qo_sd
    _rotate_pairs(src, dst, HALF * q_sd, HALF * qo_sd, cos, sin, mask)
    src = k_ptr + b * k_sb + t * k_st + h[:, None] * k_sh + j[None, :] * k_sd
    dst = ko_ptr + b * ko_sb + t * ko_st + h[:, None] * ko_sh + j[None, :] * ko_sd
    _rotate_pairs(src, dst, HALF * k_sd, HALF * ko_sd, cos, sin, mask)


@triton.jit(do_not_specialize=["seq_len"])
def _rotary_qk_packed_grad_kernel(
    dq_ptr, dk_ptr, dv_ptr, out_ptr, cos_ptr, sin_ptr,
    seq_len, n_heads,
    dq_sb, dq_st, dq_sh, dq_sd,
    dk_sb, dk_st, dk_sh, dk_sd,
    dv_sb, dv_st, dv_sh, dv_sd,
    o_sb, o_st, o_s3, o_sh, o_sd,
    c_sb, c_st, c_sd,
    s_sb, s_st, s_sd,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """The packed projection's gradient (B, T, 3, H, D) from the gradients of
    the rotated q and k and of v: q's and k's rotated back (the negative
    angle), v's copied. One pass, where autograd would rotate into new
    tensors and then stack the three; ``out`` is written through its own
    strides, never through views (a view as a kernel output makes
    torch.compile clone it first)."""
    b, t, h, j, mask, cos, sin = _heads_tile(
        seq_len, n_heads, cos_ptr, sin_ptr, c_sb, c_st, c_sd, s_sb, s_st, s_sd,
        HALF, BLOCK_HALF, BLOCK_H, True,
    )  # fmt: skip

    row = out_ptr + b * o_sb + t * o_st + h[:, None] * o_sh + j[None, :] * o_sd
    src = dq_ptr + b * dq_sb + t * dq_st + h[:, None] * dq_sh + j[None, :] * dq_sd
    _rotate_pairs(src, row, HALF * dq_sd, HALF * o_sd, cos, sin, mask)
    src = dk_ptr + b * dk_sb + t * dk_st + h[:, None] * dk_sh + j[None, :] * dk_sd
    _rotate_pairs(src, row + o_s3, HALF * dk_sd, HALF * o_sd, cos, sin, mask)
    src = dv_ptr + b * dv_sb + t * dv_st + h[:, None] * dv_sh + j[None, :] * dv_sd
    dst = row + 2 * o_s3
    tl.store(dst, tl.load(src, mask=mask).to(dst.dtype.element_ty), mask=mask)
    dst += HALF * o_sd
    src += HALF * dv_sd
    tl.store(dst, tl.load(src, mask=mask).to(dst.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seq_len"])
def _embedding_rotation_kernel(
    x_ptr, out_ptr, cos_ptr, sin_ptr,
    seq_len, scale,
    x_sb, x_st, x_sd,
    o_sb, o_st, o_sd,
    c_sb, c_st, c_sd,
    s_sb, s_st, s_sd,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, ADD_INPUT: tl.constexpr, CONJ: tl.constexpr,
):  # fmt: skip
    scale = fp32(scale)
    b, t = _row_position(seq_len)
    j = tl.arange(0, BLOCK_HALF)
    ok = j < HALF

    cos, sin = _load_angles(
        cos_ptr + b * c_sb + t * c_st, sin_ptr + b * s_sb + t * s_st, j, c_sd, s_sd, ok, CONJ
    )

    src = x_ptr + b * x_sb + t * x_st + j * x_sd
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32) * scale
    x2 = tl.load(src + HALF * x_sd, mask=ok, other=0.0).to(tl.float32) * scale
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if ADD_INPUT:
        o1 += x1
        o2 += x2
    dst = out_ptr + b * o_sb + t * o_st + j * o_sd
    tl.store(dst, o1.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HALF * o_sd, o2.to(out_ptr.dtype.element_ty), mask=ok)


def _table_strides(
    name: str, table: torch.Tensor, batch: int, seq_len: int, half: int
) -> TableStrides:
    """(batch, position, feature) strides of a cos/sin table.

    Accepts (T, D/2) or (B, T, D/2) (a batch stride of 0, from expand, is fine);
    a table of batch 1 is broadcast over the batch.
    """
    check_dtype(name, table, (torch.float32,))
    if table.dim() == 2 and tuple(table.shape) == (seq_len, half):
        return 0, table.stride(0), table.stride(1)
    if table.dim() == 3 and table.shape[1:] == (seq_len, half) and table.shape[0] in (1, batch):
        return (0 if table.shape[0] == 1 else table.stride(0)), table.stride(1), table.stride(2)
    raise ValueError(
        f"{name} must have shape ({batch}, {seq_len}, {half}), (1, {seq_len}, {half}) or "
        f"({seq_len}, {half}); got {tuple(table.shape)}"
    )


def check_rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[TableStrides, TableStrides]:
    """Clear errors for inputs the rotary_qk kernel cannot take; else the tables'
    strides, (cos's, sin's), which the launchers pass on (checked once per launch:
    eager launches are host-bound at the SIR shape)."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(
            f"q and k must both be (batch, seq_len, heads, head_dim); got {tuple(q.shape)} "
            f"and {tuple(k.shape)}"
        )
    head_dim = q.shape[-1]
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim must be even and at most {MAX_HEAD_DIM} (RoPE rotates pairs "
            f"(j, j + head_dim/2)); got {head_dim}"
        )
    check_dtype("q", q)
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must share a dtype; got {q.dtype} and {k.dtype}")
    batch, seq_len = q.shape[:2]
    strides = (
        _table_strides("cos", cos, batch, seq_len, head_dim // 2),
        _table_strides("sin", sin, batch, seq_len, head_dim // 2),
    )
    # last: a wrong shape or dtype is named the same on every machine
    check_device(q, k, cos, sin)
    return strides


def rotary_qk_blocks(half: int, heads: int) -> tuple[int, int, int]:
    """(BLOCK_HALF, BLOCK_H, num_warps) of a rotary_qk program for head_dim = 2 * half."""
    block_half = next_power_of_2(half)
    # ~2k elements per program and tensor: enough work per program to hide
    # latency, few enough registers for head dims up to 256
    block_h = max(1, min(next_power_of_2(heads), 2048 // block_half))
    # at least two pairs per thread: at the SIR shape with head_dim 64 (4 heads
    # of 32 pairs), 4 warps ran at 77% of the copy bandwidth and 2 at 96%; with
    # head_dim 128, 1 to 4 warps all at 98% (H100, tools/rotary_tune.py)
    num_warps = max(1, min(4, block_h * block_half // 64))
    return block_half, block_h, num_warps


def rotary_qk_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    conj: bool = False,
    wrap: Callable = no_wrap,
) -> None:
    """Rotate q and k (B, T, H, D) into q_out and k_out (which may be q and k)."""
    cos_strides, sin_strides = check_rotary_qk(q, k, cos, sin)
    batch, seq_len, heads, head_dim = q.shape
    half = head_dim // 2
    if q.numel() == 0:
        return
    block_half, block_h, num_warps = rotary_qk_blocks(half, heads)
    grid = (batch * seq_len, cdiv(heads, block_h))
    wrap(_rotary_qk_kernel)[grid](
        q, k, q_out, k_out, cos, sin,
        seq_len, heads,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        *cos_strides, *sin_strides,
        HALF=half, BLOCK_HALF=block_half, BLOCK_H=block_h, CONJ=conj,
        num_warps=num_warps,
    )  # fmt: skip


def rotary_qk_packed_grad_launch(
    d_q: torch.Tensor,
    d_k: torch.Tensor,
    d_v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out: torch.Tensor,
    wrap: Callable = no_wrap,
) -> None:
    """out (B, T, 3, H, D) = (d_q and d_k rotated by the negative angle, d_v):
    the packed projection's gradient when q and k were rotated (B, T, H, D each)."""
    cos_strides, sin_strides = check_rotary_qk(d_q, d_k, cos, sin)
    batch, seq_len, heads, head_dim = d_q.shape
    if d_v.shape != d_q.shape or d_v.dtype != d_q.dtype:
        raise ValueError(
            f"d_v must be like d_q {tuple(d_q.shape)} {d_q.dtype}; got {tuple(d_v.shape)} {d_v.dtype}"
        )
    if out.shape != (batch, seq_len, 3, heads, head_dim):
        raise ValueError(
            f"out must be ({batch}, {seq_len}, 3, {heads}, {head_dim}); got {tuple(out.shape)}"
        )
    check_device(d_q, d_v, out)
    half = head_dim // 2
    if d_q.numel() == 0:
        return
    block_half, block_h, num_warps = rotary_qk_blocks(half, heads)
    grid = (batch * seq_len, cdiv(heads, block_h))
    wrap(_rotary_qk_packed_grad_kernel)[grid](
        d_q, d_k, d_v, out, cos, sin,
        seq_len, heads,
        *d_q.stride(), *d_k.stride(), *d_v.stride(), *out.stride(),
        *cos_strides, *sin_strides,
        HALF=half, BLOCK_HALF=block_half, BLOCK_H=block_h,
        num_warps=num_warps,
    )  # fmt: skip


def check_embedding_rotation(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[TableStrides, TableStrides]:
    """Clear errors for inputs the embedding-rotation kernel cannot take; else the
    tables' strides, as check_rotary_qk."""
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, seq_len, d_model); got {tuple(x.shape)}")
    if x.shape[-1] % 2:
        raise ValueError(f"d_model must be even (pairs (i, i + d/2)); got {x.shape[-1]}")
    check_dtype("x", x)
    batch, seq_len, d_model = x.shape
    strides = (
        _table_strides("cos", cos, batch, seq_len, d_model // 2),
        _table_strides("sin", sin, batch, seq_len, d_model // 2),
    )
    check_device(x, cos, sin)  # last, as in check_rotary_qk
    return strides


def embedding_rotation_launch(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out: torch.Tensor,
    scale: float = 1.0,
    add_input: bool = True,
    conj: bool = False,
    wrap: Callable = no_wrap,
) -> None:
    """out = s + rotate(s) (add_input) or rotate(s), with s = x * scale; x: (B, T, d)."""
    cos_strides, sin_strides = check_embedding_rotation(x, cos, sin)
    batch, seq_len, d_model = x.shape
    half = d_model // 2
    if x.numel() == 0:
        return
    wrap(_embedding_rotation_kernel)[(batch * seq_len,)](
        x, out, cos, sin,
        seq_len, float(scale),
        *x.stride(), *out.stride(),
        *cos_strides, *sin_strides,
        HALF=half, BLOCK_HALF=next_power_of_2(half), ADD_INPUT=add_input, CONJ=conj,
    )  # fmt: skip
