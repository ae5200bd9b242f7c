"""Triton kernels for the two add & norms of an encoder layer at d_mlp 0, and
their host launchers.

At d_mlp 0 (workingmem's default, the SIR model) the feed-forward block's
output is linear2's bias ``c`` at every position, so the post-LN layer ends in::

    x1  = layer_norm(x + dropout(y)) * w1 + b1     # norm1, after attention
    out = layer_norm(x1 + dropout(c)) * w2 + b2    # norm2, after the block

Two passes of ``wmfast.kernels.layer_norm`` write x1 and both sums and read
x1 back; here one pass reads x and y and writes ``out`` (and its copy in the
matrix products' dtype), keeping x1 in registers. The backward recomputes x1
from the saved first sum instead of reading it: at d_model 512 in bf16 about
40% fewer bytes each way than the two single kernels (the module docstring
of wmfast.ops.bias_ffn_norms counts them).

Roundings are the composition's: x1 in the output's dtype, ``dropout(c)`` in
c's dtype, the sums in theirs; math is fp32 in registers. The two dropout
masks come from two seeds and are kept as bytes for the backward, as in
``wmfast.kernels.layer_norm``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from wmfast.kernels import layer_norm
from wmfast.kernels._triton import (
    cdiv,
    check_device,
    check_dtype,
    check_interpreter_runs_loops,
    fp32,
    no_wrap,
    tl,
    triton,
)
from wmfast.kernels.layer_norm import (
    _dropout_add,
    _keep_mask,
    _norm_input_grad,
    _output_grad,
    _row_stats,
    _rows,
    _store_sum_grads,
    backward_programs,
    check_dropout_add_layer_norm,
    forward_blocks,
)

# the weight-type gradients the backward returns, in this order
PARAM_GRADS = ("norm1_weight", "norm1_bias", "ffn_bias", "norm2_weight", "norm2_bias")


@triton.jit
def _first_norm(s1, w1, b1, col_ok, n_cols, eps, X1_DTYPE: tl.constexpr):
    """(x1, x_hat1, rstd1): norm1's output rounded to its dtype, from the fp32 sum tile."""
    centered, rstd = _row_stats(s1, col_ok, n_cols, eps)
    x_hat = centered * rstd[:, None]
    x1 = (x_hat * w1[None, :] + b1[None, :]).to(X1_DTYPE).to(tl.float32)
    return x1, x_hat, rstd


@triton.jit
def _bias_tile(c, keep, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr):
    """dropout(c) over a (BLOCK_M, BLOCK_N) tile with the mask ``keep``, in
    c's dtype (F.dropout's value, rounded as it returns it)."""
    tile = tl.broadcast_to(c[None, :], (BLOCK_M, BLOCK_N))
    if DROPOUT:
        tile = tl.where(keep, tile.to(tl.float32) * scale, 0.0).to(c.dtype)
    return tile


@triton.jit
def _bias_ffn_norms_fwd_kernel(
    x_ptr, y_ptr, w1_ptr, b1_ptr, c_ptr, w2_ptr, b2_ptr, seed_ptr,
    out_ptr, low_ptr, sum_ptr, keep1_ptr, keep2_ptr,
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

    # norm1: as _dropout_add_layer_norm_fwd_kernel
    s1 = _dropout_add(
        x_ptr, y_ptr, keep1_ptr, seed_ptr, rows, cols, ok, x_sr, y_sr, keep_sr,
        n_cols, p, scale, sum_ptr.dtype.element_ty, BLOCK_M, BLOCK_N, DROPOUT,
    )  # fmt: skip
    if WRITE_SUM:  # for the backward, which recomputes x1 from it
        tl.store(sum_ptr + rows[:, None] * sum_sr + cols[None, :], s1, mask=ok)
    w1 = tl.load(w1_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b1 = tl.load(b1_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    x1, _, _ = _first_norm(s1.to(tl.float32), w1, b1, col_ok, n_cols, eps, out_ptr.dtype.element_ty)

    # norm2 of x1 + dropout(c)
    c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    keep2 = None
    if DROPOUT:  # the second mask, from the second seed
        keep2 = _keep_mask(tl.load(seed_ptr + 1), rows, n_cols, p, BLOCK_M, BLOCK_N)
        tl.store(keep2_ptr + rows[:, None] * keep_sr + cols[None, :], keep2, mask=ok)
    c_tile = _bias_tile(c, keep2, scale, BLOCK_M, BLOCK_N, DROPOUT)
    s2 = (x1 + c_tile.to(tl.float32)).to(out_ptr.dtype.element_ty).to(tl.float32)
    centered, rstd = _row_stats(s2, col_ok, n_cols, eps)
    w2 = tl.load(w2_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b2 = tl.load(b2_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = centered * rstd[:, None] * w2[None, :] + b2[None, :]
    tl.store(out_ptr + rows[:, None] * out_sr + cols[None, :], out, mask=ok)
    if WRITE_LOW:
        tl.store(low_ptr + rows[:, None] * low_sr + cols[None, :], out, mask=ok)


@triton.jit
def _bias_ffn_norms_bwd_kernel(
    d_out_ptr, d_low_ptr, sum_ptr, keep1_ptr, keep2_ptr, w1_ptr, b1_ptr, c_ptr, w2_ptr,
    d_x_ptr, d_y_ptr, part_ptr,
    n_rows, n_cols, rows_per_program, n_programs, scale, eps,
    d_out_sr, d_low_sr, sum_sr, keep_sr, d_x_sr, d_y_sr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_D_OUT: tl.constexpr, HAS_D_LOW: tl.constexpr,
):  # fmt: skip
    """Each program loops over its run of rows and keeps its shares of the five
    weight-type gradients (PARAM_GRADS) in registers; part_ptr is
    (5, n_programs, n_cols) fp32 and the host sums over programs."""
    scale, eps = fp32(scale), fp32(eps)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w1 = tl.load(w1_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b1 = tl.load(b1_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    d_w1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    d_b1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    d_c = tl.zeros((BLOCK_N,), dtype=tl.float32)
    d_w2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    d_b2 = tl.zeros((BLOCK_N,), dtype=tl.float32)

    first = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        ok = (rows < end)[:, None] & col_ok[None, :]
        # the forward again, up to norm2's normalised input
        s1 = tl.load(sum_ptr + rows[:, None] * sum_sr + cols[None, :], mask=ok, other=0.0)
        x1, x_hat1, rstd1 = _first_norm(
            s1.to(tl.float32), w1, b1, col_ok, n_cols, eps, sum_ptr.dtype.element_ty
        )
        keep2 = None
        if DROPOUT:
            keep2 = tl.load(keep2_ptr + rows[:, None] * keep_sr + cols[None, :], mask=ok, other=0)
            keep2 = keep2 != 0
        c_tile = _bias_tile(c, keep2, scale, BLOCK_M, BLOCK_N, DROPOUT)
        s2 = (x1 + c_tile.to(tl.float32)).to(sum_ptr.dtype.element_ty).to(tl.float32)
        centered2, rstd2 = _row_stats(s2, col_ok, n_cols, eps)
        x_hat2 = centered2 * rstd2[:, None]

        # norm2's backward
        g = _output_grad(
            d_out_ptr, d_low_ptr, rows, cols, ok, d_out_sr, d_low_sr,
            BLOCK_M, BLOCK_N, HAS_D_OUT, HAS_D_LOW,
        )  # fmt: skip
        d_w2 += tl.sum(g * x_hat2, axis=0)
        d_b2 += tl.sum(g, axis=0)
        d_s2 = _norm_input_grad(g, w2, x_hat2, rstd2, n_cols)
        d_s2 = d_s2.to(sum_ptr.dtype.element_ty).to(tl.float32)  # in the sum's dtype
        # c's side of the add: in c's dtype, through the mask; summed over the positions
        d_c_tile = d_s2.to(c.dtype)
        if DROPOUT:
            d_c_tile = tl.where(keep2, d_c_tile.to(tl.float32) * scale, 0.0).to(c.dtype)
        d_c += tl.sum(d_c_tile.to(tl.float32), axis=0)

        # norm1's backward, from x1's gradient (d_s2: x1 is the sum's other side)
        d_w1 += tl.sum(d_s2 * x_hat1, axis=0)
        d_b1 += tl.sum(d_s2, axis=0)
        d_s1 = _norm_input_grad(d_s2, w1, x_hat1, rstd1, n_cols)
        _store_sum_grads(
            d_s1.to(sum_ptr.dtype.element_ty), d_x_ptr, d_y_ptr, keep1_ptr, rows, cols, ok,
            d_x_sr, d_y_sr, keep_sr, scale, DROPOUT,
        )  # fmt: skip

    share = part_ptr + pid * n_cols + cols
    step = n_programs * n_cols  # from one gradient's shares to the next's
    tl.store(share, d_w1, mask=col_ok)
    tl.store(share + step, d_b1, mask=col_ok)
    tl.store(share + 2 * step, d_c, mask=col_ok)
    tl.store(share + 3 * step, d_w2, mask=col_ok)
    tl.store(share + 4 * step, d_b2, mask=col_ok)


def check_bias_ffn_norms(
    x: torch.Tensor,
    y: torch.Tensor,
    norm1_weight: torch.Tensor,
    norm1_bias: torch.Tensor,
    ffn_bias: torch.Tensor,
    norm2_weight: torch.Tensor,
    norm2_bias: torch.Tensor,
    p: float,
    out_dtype: torch.dtype,
) -> None:
    """Clear errors for inputs the kernels cannot take."""
    check_dropout_add_layer_norm(x, y, norm1_weight, norm1_bias, p)
    n_cols = x.shape[-1]
    for name, t in (
        ("ffn_bias", ffn_bias),
        ("norm2_weight", norm2_weight),
        ("norm2_bias", norm2_bias),
    ):
        if t.shape != (n_cols,):
            raise ValueError(f"{name} must have shape ({n_cols},); got {tuple(t.shape)}")
        check_dtype(name, t)
    # x1 and both sums share one dtype (the kernels round them alike)
    if torch.promote_types(x.dtype, y.dtype) != out_dtype:
        raise TypeError(
            f"x + y must be in the output's dtype {out_dtype}; got {x.dtype} + {y.dtype}"
        )
    if torch.promote_types(out_dtype, ffn_bias.dtype) != out_dtype:
        raise TypeError(f"ffn_bias ({ffn_bias.dtype}) must not promote the output's {out_dtype}")
    check_device(x, y, norm1_weight, norm1_bias, ffn_bias, norm2_weight, norm2_bias)


def backward_blocks(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the backward: one row per step, as the
    single kernel's backward, with twice its warps. It keeps five gradient
    shares and both norms' rows in registers: at d_model 512 with 2 warps
    that is 192 registers a thread (5 programs per SM), with 4 warps 80, the
    single kernel's count at 2 (ptxas for sm_90,
    tests/kernels/test_bias_ffn_norms_gpu_build.py). Not yet tuned on a GPU."""
    block_m, block_n, warps = layer_norm.backward_blocks(n_cols)
    return block_m, block_n, min(16, 2 * warps)


def bias_ffn_norms_fwd_launch(
    x: torch.Tensor,
    y: torch.Tensor,
    norm1_weight: torch.Tensor,
    norm1_bias: torch.Tensor,
    ffn_bias: torch.Tensor,
    norm2_weight: torch.Tensor,
    norm2_bias: torch.Tensor,
    seeds: torch.Tensor | None,
    p: float,
    eps: float,
    out: torch.Tensor,
    low: torch.Tensor | None,
    s: torch.Tensor | None,
    keep1: torch.Tensor | None,
    keep2: torch.Tensor | None,
    wrap: Callable = no_wrap,
) -> None:
    """out (and low, if given) = norm2(norm1(x + dropout(y)) + dropout(ffn_bias));
    s (the first sum) and the masks (if given) for the backward. Dropout runs
    when ``seeds`` (int64, two elements on x's device) is given and p > 0; then
    both keep tensors are required."""
    check_bias_ffn_norms(
        x, y, norm1_weight, norm1_bias, ffn_bias, norm2_weight, norm2_bias, p, out.dtype
    )
    dropout = seeds is not None and p > 0
    if dropout and (keep1 is None or keep2 is None):
        raise ValueError("dropout needs two keep tensors to record its masks in")
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    if n_rows == 0:
        return
    block_m, block_n, warps = forward_blocks(n_cols)
    x2, y2, out2 = _rows(x, n_cols), _rows(y, n_cols), out.view(-1, n_cols)
    low2 = low.view(-1, n_cols) if low is not None else out2
    s2 = s.view(-1, n_cols) if s is not None else out2
    keep1_2 = keep1.view(-1, n_cols) if dropout else out2
    keep2_2 = keep2.view(-1, n_cols) if dropout else out2
    wrap(_bias_ffn_norms_fwd_kernel)[(cdiv(n_rows, block_m),)](
        x2, y2, norm1_weight, norm1_bias, ffn_bias, norm2_weight, norm2_bias,
        seeds if dropout else x2,
        out2, low2, s2, keep1_2, keep2_2,
        n_rows, n_cols, float(p), 1.0 / (1.0 - p), float(eps),
        x2.stride(0), y2.stride(0), out2.stride(0), low2.stride(0), s2.stride(0),
        keep1_2.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n,
        DROPOUT=dropout, WRITE_LOW=low is not None, WRITE_SUM=s is not None,
        num_warps=warps,
    )  # fmt: skip


def bias_ffn_norms_bwd_launch(
    d_out: torch.Tensor | None,
    d_low: torch.Tensor | None,
    s: torch.Tensor,
    keep1: torch.Tensor | None,
    keep2: torch.Tensor | None,
    norm1_weight: torch.Tensor,
    norm1_bias: torch.Tensor,
    ffn_bias: torch.Tensor,
    norm2_weight: torch.Tensor,
    p: float,
    eps: float,
    d_x: torch.Tensor,
    d_y: torch.Tensor,
    wrap: Callable = no_wrap,
) -> torch.Tensor:
    """Write the gradients of x and y; return those of PARAM_GRADS as one
    (5, d) fp32 tensor (summed over the programs' shares)."""
    check_interpreter_runs_loops("bias_ffn_norms' backward")
    n_cols = s.shape[-1]
    n_rows = s.numel() // n_cols
    block_m, block_n, warps = backward_blocks(n_cols)
    programs = backward_programs(n_rows, block_m, warps, s.device)
    parts = torch.empty(len(PARAM_GRADS), programs, n_cols, device=s.device, dtype=torch.float32)
    if n_rows == 0:
        return parts.zero_().sum(1)
    rows_per_program = cdiv(cdiv(n_rows, programs), block_m) * block_m
    s2, d_x2, d_y2 = s.view(-1, n_cols), d_x.view(-1, n_cols), d_y.view(-1, n_cols)
    d_out2 = _rows(d_out, n_cols) if d_out is not None else s2
    d_low2 = _rows(d_low, n_cols) if d_low is not None else s2
    dropout = keep1 is not None and keep2 is not None and p > 0
    keep1_2 = keep1.view(-1, n_cols) if dropout else s2
    keep2_2 = keep2.view(-1, n_cols) if dropout else s2
    wrap(_bias_ffn_norms_bwd_kernel)[(programs,)](
        d_out2, d_low2, s2, keep1_2, keep2_2,
        norm1_weight, norm1_bias, ffn_bias, norm2_weight,
        d_x2, d_y2, parts,
        n_rows, n_cols, rows_per_program, programs, 1.0 / (1.0 - p), float(eps),
        d_out2.stride(0), d_low2.stride(0), s2.stride(0), keep1_2.stride(0),
        d_x2.stride(0), d_y2.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n,
        DROPOUT=dropout, HAS_D_OUT=d_out is not None, HAS_D_LOW=d_low is not None,
        num_warps=warps,
    )  # fmt: skip
    return parts.sum(1)
