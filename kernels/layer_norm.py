"""Triton kernels for dropout + residual add + LayerNorm, and their host launchers.

What the post-LN encoder layer computes twice per layer (``norm1`` after
attention, ``norm2`` after the feed-forward block)::

    s   = x + dropout(y)          # x: the residual stream, y: the block's output
    out = layer_norm(s) * w + b

as one pass over the rows (one row = one position's d_model features), and its
backward as one more. Math is fp32 in registers; storage is fp32, fp16 or
bf16, with the reference's roundings kept where it rounds (the dropped-out
``y`` in y's dtype, ``s`` in the promoted dtype of x and y).

Why a kernel of our own, when torch.compile fuses the same math: under bf16
autocast the layer-norm output is fp32 and every consumer matrix product casts
it to bf16 again, and its gradient comes back as two tensors (the residual's
fp32 and the product's bf16) that must be added before the norm's backward.
The forward here writes the bf16 copy itself (``low``) and the backward takes
both gradients and adds them in registers, so neither the cast nor the add is
a pass of its own. The dropout mask comes from Philox four draws at a time
(``tl.rand4x``: a quarter of the integer work of one ``tl.rand`` per
element) and is kept as one byte per element for the backward, as
PyTorch's own dropout keeps it.

* ``_dropout_add_layer_norm_fwd_kernel``: BLOCK_M rows per program.
* ``_dropout_add_layer_norm_bwd_kernel``: a fixed number of programs, each
  looping over a contiguous run of rows and keeping its share of the
  weight and bias gradients in registers; the host sums the shares.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from wmfast.kernels._triton import (
    INTERPRETED,
    cdiv,
    check_device,
    check_dtype,
    check_interpreter_runs_loops,
    fp32,
    next_power_of_2,
    no_wrap,
    tl,
    triton,
)

MAX_COLS = 8192  # one row lives in registers: d_model up to 8192


@triton.jit
def _keep_mask(seed, rows, n_cols, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which elements of the (BLOCK_M, BLOCK_N) tile dropout keeps (probability 1 - p).

    Element (r, c) takes draw c % 4 of Philox counter r * ceil(n_cols / 4) + c // 4:
    the same mask for the same seed, whatever the block sizes."""
    groups = (n_cols + 3) // 4
    g = tl.arange(0, BLOCK_N // 4)
    counter = rows[:, None] * groups + g[None, :]  # int64: rows * groups may pass 2**31
    u0, u1, u2, u3 = tl.rand4x(seed, counter)  # uniform in [0, 1)
    # (BLOCK_M, BLOCK_N // 4, 2, 2) -> (BLOCK_M, BLOCK_N): draws 0, 1, 2, 3 of a counter
    # land on columns 4g, 4g + 1, 4g + 2, 4g + 3
    draws = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (BLOCK_M, BLOCK_N))
    return draws >= p


@triton.jit
def _row_stats(s, col_ok, n_cols, eps):
    """(s - mean, 1 / sqrt(var + eps)) per row of the fp32 tile s; two passes, as
    the masked columns must not count."""
    mean = tl.sum(s, axis=1) / n_cols
    centered = tl.where(col_ok[None, :], s - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / n_cols
    return centered, tl.rsqrt(var + eps)


@triton.jit
def _norm_input_grad(g, w, x_hat, rstd, n_cols):
    """The gradient of layer_norm's input for the output gradient g (fp32 tiles;
    x_hat and g are 0 in masked columns, so they drop out of the means)."""
    g_w = g * w[None, :]
    mean_gw = tl.sum(g_w, axis=1) / n_cols
    mean_gw_xhat = tl.sum(g_w * x_hat, axis=1) / n_cols
    return (g_w - mean_gw[:, None] - x_hat * mean_gw_xhat[:, None]) * rstd[:, None]


@triton.jit
def _dropout_add(x_ptr, y_ptr, keep_ptr, seed_ptr, rows, cols, ok, x_sr, y_sr, keep_sr,
                 n_cols, p, scale, SUM_DTYPE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr):  # fmt: skip
    """``x + dropout(y)`` over a tile, in SUM_DTYPE (their promoted dtype); the
    mask, drawn from the seed at ``seed_ptr``, is stored for the backward."""
    x = tl.load(x_ptr + rows[:, None] * x_sr + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows[:, None] * y_sr + cols[None, :], mask=ok, other=0.0)
    if DROPOUT:
        keep = _keep_mask(tl.load(seed_ptr), rows, n_cols, p, BLOCK_M, BLOCK_N)
        tl.store(keep_ptr + rows[:, None] * keep_sr + cols[None, :], keep, mask=ok)
        # F.dropout's value, rounded to y's dtype as it returns it
        y = tl.where(keep, y.to(tl.float32) * scale, 0.0).to(y_ptr.dtype.element_ty)
    return (x + y.to(tl.float32)).to(SUM_DTYPE)


@triton.jit
def _output_grad(d_out_ptr, d_low_ptr, rows, cols, ok, d_out_sr, d_low_sr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_D_OUT: tl.constexpr, HAS_D_LOW: tl.constexpr):  # fmt: skip
    """The gradient of a norm's output over a tile, fp32: its own, plus the low
    copy's (the add autograd would otherwise run as a pass of its own)."""
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_D_OUT:
        g += tl.load(d_out_ptr + rows[:, None] * d_out_sr + cols[None, :], mask=ok, other=0.0).to(
            tl.float32
        )
    if HAS_D_LOW:
        g += tl.load(d_low_ptr + rows[:, None] * d_low_sr + cols[None, :], mask=ok, other=0.0).to(
            tl.float32
        )
    return g


@triton.jit
def _store_sum_grads(d_s, d_x_ptr, d_y_ptr, keep_ptr, rows, cols, ok, d_x_sr, d_y_sr, keep_sr,
                     scale, DROPOUT: tl.constexpr):  # fmt: skip
    """Store the gradient of ``s = x + dropout(y)`` (d_s, in s's dtype) as x's,
    and through the mask as y's (the add hands y's side its dtype)."""
    tl.store(d_x_ptr + rows[:, None] * d_x_sr + cols[None, :], d_s, mask=ok)
    d_y = d_s.to(d_y_ptr.dtype.element_ty)
    if DROPOUT:
        keep = tl.load(keep_ptr + rows[:, None] * keep_sr + cols[None, :], mask=ok, other=0)
        d_y = tl.where(keep != 0, d_y.to(tl.float32) * scale, 0.0)
    tl.store(d_y_ptr + rows[:, None] * d_y_sr + cols[None, :], d_y, mask=ok)


@triton.jit
def _dropout_add_layer_norm_fwd_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, seed_ptr,
    out_ptr, low_ptr, sum_ptr, keep_ptr,
    n_rows, n_cols, p, scale, eps,
    x_sr, y_sr, out_sr, low_sr, sum_sr, keep_sr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr, WRITE_LOW: tl.constexpr, WRITE_SUM: tl.constexpr,
):  # fmt: skip
    p, scale, eps = fp32(p), fp32(scale), fp32(eps)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    ok = (rows < n_rows)[:, None] & col_ok[None, :]

    s = _dropout_add(
        x_ptr, y_ptr, keep_ptr, seed_ptr, rows, cols, ok, x_sr, y_sr, keep_sr,
        n_cols, p, scale, sum_ptr.dtype.element_ty, BLOCK_M, BLOCK_N, DROPOUT,
    )  # fmt: skip
    if WRITE_SUM:  # for the backward
        tl.store(sum_ptr + rows[:, None] * sum_sr + cols[None, :], s, mask=ok)

    centered, rstd = _row_stats(s.to(tl.float32), col_ok, n_cols, eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = centered * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + rows[:, None] * out_sr + cols[None, :], out, mask=ok)
    if WRITE_LOW:  # the copy a matrix product under autocast would cast for itself
        tl.store(low_ptr + rows[:, None] * low_sr + cols[None, :], out, mask=ok)


@triton.jit
def _dropout_add_layer_norm_bwd_kernel(
    d_out_ptr, d_low_ptr, sum_ptr, keep_ptr, w_ptr,
    d_x_ptr, d_y_ptr, d_w_part_ptr, d_b_part_ptr,
    n_rows, n_cols, rows_per_program, scale, eps,
    d_out_sr, d_low_sr, sum_sr, keep_sr, d_x_sr, d_y_sr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_D_OUT: tl.constexpr, HAS_D_LOW: tl.constexpr,
):  # fmt: skip
    scale, eps = fp32(scale), fp32(eps)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    d_w = tl.zeros((BLOCK_N,), dtype=tl.float32)
    d_b = tl.zeros((BLOCK_N,), dtype=tl.float32)

    first = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        ok = (rows < end)[:, None] & col_ok[None, :]
        s = tl.load(sum_ptr + rows[:, None] * sum_sr + cols[None, :], mask=ok, other=0.0)
        centered, rstd = _row_stats(s.to(tl.float32), col_ok, n_cols, eps)
        x_hat = centered * rstd[:, None]
        g = _output_grad(
            d_out_ptr, d_low_ptr, rows, cols, ok, d_out_sr, d_low_sr,
            BLOCK_M, BLOCK_N, HAS_D_OUT, HAS_D_LOW,
        )  # fmt: skip
        d_w += tl.sum(g * x_hat, axis=0)
        d_b += tl.sum(g, axis=0)

        d_s = _norm_input_grad(g, w, x_hat, rstd, n_cols)
        d_s = d_s.to(sum_ptr.dtype.element_ty)  # s's gradient in s's dtype
        _store_sum_grads(
            d_s, d_x_ptr, d_y_ptr, keep_ptr, rows, cols, ok, d_x_sr, d_y_sr, keep_sr,
            scale, DROPOUT,
        )  # fmt: skip

    tl.store(d_w_part_ptr + pid * n_cols + cols, d_w, mask=col_ok)
    tl.store(d_b_part_ptr + pid * n_cols + cols, d_b, mask=col_ok)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """t as (rows, n_cols) with unit column stride: a view when its layout allows
    (contiguous, or rows broadcast with stride 0), else a contiguous copy."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, n_cols)


def check_dropout_add_layer_norm(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: float
) -> None:
    """Clear errors for inputs the kernels cannot take."""
    if x.dim() < 1 or x.shape != y.shape:
        raise ValueError(
            f"x and y must have one shape (..., d); got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    n_cols = x.shape[-1]
    if not 0 < n_cols <= MAX_COLS:
        raise ValueError(f"the normalized size must be in 1..{MAX_COLS}; got {n_cols}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (n_cols,):
            raise ValueError(f"{name} must have shape ({n_cols},); got {tuple(t.shape)}")
        check_dtype(name, t)
    check_dtype("x", x)
    check_dtype("y", y)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1); got {p}")
    check_device(x, y, weight, bias)  # last: a wrong shape or dtype is named the same everywhere


def _block_n(n_cols: int) -> int:
    """Whole rows in a power-of-two block, at least 4 (_keep_mask draws in fours)."""
    return max(4, next_power_of_2(n_cols))


def forward_blocks(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward: whole rows, ~1k elements per
    program and 8 per thread. At d_model 512 on an H100 every setting from 1 to
    8 rows and 1 to 8 warps ran at 97-98% of the copy bandwidth
    (tools/layer_norm_tune.py); more per thread costs registers (8 rows took 177
    registers, 2 take 56: ptxas for sm_90, tests/kernels/gpu_build.py)."""
    block_n = _block_n(n_cols)
    block_m = max(1, 1024 // block_n)
    warps = min(16, max(4, block_n // 256))
    return block_m, block_n, warps


def backward_blocks(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the backward: one row per step and 8
    elements per thread. Its per-row reductions sit between the loads and the
    stores, so the loads of many small programs must overlap: at d_model 512 on
    an H100, 1 row and 2 warps took 0.71-0.75 ms (79-83% of the copy bandwidth),
    2 rows and 4 warps 1.56 ms, 8 rows 0.85-2.5 ms (tools/layer_norm_tune.py)."""
    block_n = _block_n(n_cols)
    warps = min(16, max(1, block_n // 256))
    return 1, block_n, warps


def dropout_add_layer_norm_fwd_launch(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    seed: torch.Tensor | None,
    p: float,
    eps: float,
    out: torch.Tensor,
    low: torch.Tensor | None,
    s: torch.Tensor | None,
    keep: torch.Tensor | None,
    wrap: Callable = no_wrap,
) -> None:
    """out (and low, if given) = layer_norm(x + dropout(y)); s and keep (if given) for
    the backward. Dropout runs when ``seed`` (an int64 tensor of one element on
    x's device) is given and p > 0; then ``keep`` is required."""
    check_dropout_add_layer_norm(x, y, weight, bias, p)
    dropout = seed is not None and p > 0
    if dropout and keep is None:
        raise ValueError("dropout needs a keep tensor to record its mask in")
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    if n_rows == 0:
        return
    block_m, block_n, warps = forward_blocks(n_cols)
    x2, y2, out2 = _rows(x, n_cols), _rows(y, n_cols), out.view(-1, n_cols)
    low2 = low.view(-1, n_cols) if low is not None else out2
    s2 = s.view(-1, n_cols) if s is not None else out2
    keep2 = keep.view(-1, n_cols) if dropout else out2
    wrap(_dropout_add_layer_norm_fwd_kernel)[(cdiv(n_rows, block_m),)](
        x2, y2, weight, bias, seed if dropout else x2,
        out2, low2, s2, keep2,
        n_rows, n_cols, float(p), 1.0 / (1.0 - p), float(eps),
        x2.stride(0), y2.stride(0), out2.stride(0), low2.stride(0), s2.stride(0),
        keep2.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n,
        DROPOUT=dropout, WRITE_LOW=low is not None, WRITE_SUM=s is not None,
        num_warps=warps,
    )  # fmt: skip


def backward_programs(n_rows: int, block_m: int, warps: int, device: torch.device) -> int:
    """How many programs share the backward's rows: as many as an SM keeps
    resident (2048 threads, at most 32 programs), so every SM stays busy and
    the weight-gradient shares stay few (one (d,) row each: 17 MB at d 512 on
    an H100, summed in ~10 us); a handful under the interpreter."""
    if device.type == "cuda" and not INTERPRETED:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = min(32, 64 // warps) * sms
    else:
        wanted = 4
    # torch.sym_min/sym_max, not min/max: under torch.compile with dynamic
    # shapes n_rows is symbolic, and a Python comparison of it would become a
    # guard (a second graph once the rows cross `wanted`); on ints they are min/max
    return torch.sym_max(1, torch.sym_min(wanted, cdiv(n_rows, block_m)))


def dropout_add_layer_norm_bwd_launch(
    d_out: torch.Tensor | None,
    d_low: torch.Tensor | None,
    s: torch.Tensor,
    keep: torch.Tensor | None,
    weight: torch.Tensor,
    p: float,
    eps: float,
    d_x: torch.Tensor,
    d_y: torch.Tensor,
    wrap: Callable = no_wrap,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the gradients of x and y (s's gradient, in d_x's and d_y's dtypes, the
    latter through the dropout mask) and return those of weight and bias (fp32)."""
    check_interpreter_runs_loops("dropout_add_layer_norm's backward")
    n_cols = s.shape[-1]
    n_rows = s.numel() // n_cols
    block_m, block_n, warps = backward_blocks(n_cols)
    programs = backward_programs(n_rows, block_m, warps, s.device)
    d_w_part = torch.empty(programs, n_cols, device=s.device, dtype=torch.float32)
    d_b_part = torch.empty_like(d_w_part)
    if n_rows == 0:
        return d_w_part.zero_().sum(0), d_b_part.zero_().sum(0)
    # whole blocks per program, so no block straddles two programs
    rows_per_program = cdiv(cdiv(n_rows, programs), block_m) * block_m
    s2, d_x2, d_y2 = s.view(-1, n_cols), d_x.view(-1, n_cols), d_y.view(-1, n_cols)
    d_out2 = _rows(d_out, n_cols) if d_out is not None else s2
    d_low2 = _rows(d_low, n_cols) if d_low is not None else s2
    dropout = keep is not None and p > 0
    keep2 = keep.view(-1, n_cols) if dropout else s2
    wrap(_dropout_add_layer_norm_bwd_kernel)[(programs,)](
        d_out2, d_low2, s2, keep2, weight,
        d_x2, d_y2, d_w_part, d_b_part,
        n_rows, n_cols, rows_per_program, 1.0 / (1.0 - p), float(eps),
        d_out2.stride(0), d_low2.stride(0), s2.stride(0), keep2.stride(0),
        d_x2.stride(0), d_y2.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n,
        DROPOUT=dropout, HAS_D_OUT=d_out is not None, HAS_D_LOW=d_low is not None,
        num_warps=warps,
    )  # fmt: skip
    return d_w_part.sum(0), d_b_part.sum(0)
