"""The Triton kernels of the two add & norms at d_mlp 0 go through the real GPU
compiler, on any machine (why and how: tests/kernels/gpu_build.py)."""

from __future__ import annotations

import pytest

from .gpu_build import build_in_subprocess, compile_for_h100, needs_ptxas
from .test_layer_norm_gpu_build import FLOAT_TYPES, POINTER

pytestmark = pytest.mark.triton

# (d_model, x dtype, y dtype, c dtype, flags): the SIR model under bf16
# autocast (fp32 residual, bf16 attention output and bias, bf16 copy
# written), fp32 training, a non-power-of-two width in bf16 (a bf16 model),
# and inference (nothing saved)
FORWARD_VARIANTS = [
    (512, "fp32", "bf16", "bf16", dict(DROPOUT=True, WRITE_LOW=True, WRITE_SUM=True)),
    (512, "fp32", "fp32", "fp32", dict(DROPOUT=True, WRITE_LOW=False, WRITE_SUM=True)),
    (96, "bf16", "bf16", "bf16", dict(DROPOUT=False, WRITE_LOW=False, WRITE_SUM=True)),
    (512, "fp32", "bf16", "bf16", dict(DROPOUT=False, WRITE_LOW=True, WRITE_SUM=False)),
]
# (d_model, s dtype, y dtype, c dtype, flags)
BACKWARD_VARIANTS = [
    (512, "fp32", "bf16", "bf16", dict(DROPOUT=True, HAS_D_OUT=True, HAS_D_LOW=True)),
    (512, "fp32", "fp32", "fp32", dict(DROPOUT=True, HAS_D_OUT=True, HAS_D_LOW=False)),
    (96, "bf16", "bf16", "bf16", dict(DROPOUT=False, HAS_D_OUT=False, HAS_D_LOW=True)),
]


def _forward_signature(x: str, y: str, c: str, floats: str) -> dict:
    s = "fp32" if "fp32" in (x, y) else x  # the promoted dtype: the sums' and the output's
    pointers = dict(
        x_ptr=x, y_ptr=y, w1_ptr="fp32", b1_ptr="fp32", c_ptr=c, w2_ptr="fp32", b2_ptr="fp32",
        seed_ptr="i64", out_ptr=s, low_ptr="bf16", sum_ptr=s, keep1_ptr="bool", keep2_ptr="bool",
    )  # fmt: skip
    scalars = dict(n_rows="i32", n_cols="i32", p=floats, scale=floats, eps=floats)
    strides = {f"{n}_sr": "i32" for n in ("x", "y", "out", "low", "sum", "keep")}
    return {**{k: POINTER[v] for k, v in pointers.items()}, **scalars, **strides}


def _backward_signature(s: str, y: str, c: str, floats: str) -> dict:
    pointers = dict(
        d_out_ptr=s, d_low_ptr="bf16", sum_ptr=s, keep1_ptr="bool", keep2_ptr="bool",
        w1_ptr="fp32", b1_ptr="fp32", c_ptr=c, w2_ptr="fp32",
        d_x_ptr=s, d_y_ptr=y, part_ptr="fp32",
    )  # fmt: skip
    scalars = dict(
        n_rows="i32", n_cols="i32", rows_per_program="i32", n_programs="i32",
        scale=floats, eps=floats,
    )  # fmt: skip
    strides = {f"{n}_sr": "i32" for n in ("d_out", "d_low", "sum", "keep", "d_x", "d_y")}
    return {**{k: POINTER[v] for k, v in pointers.items()}, **scalars, **strides}


def build_all() -> None:
    """Compile every variant; print one line per kernel built (run in the subprocess)."""
    from wmfast.kernels import bias_ffn_norms as K
    from wmfast.kernels import layer_norm as L

    for i, (d_model, x, y, c, flags) in enumerate(FORWARD_VARIANTS):
        block_m, block_n, warps = L.forward_blocks(d_model)
        sizes = dict(BLOCK_M=block_m, BLOCK_N=block_n)
        for floats in FLOAT_TYPES if i == 0 else FLOAT_TYPES[:1]:
            signature = _forward_signature(x, y, c, floats)
            kernel = K._bias_ffn_norms_fwd_kernel
            print(compile_for_h100(kernel, signature, {**sizes, **flags}, num_warps=warps), floats)
    for i, (d_model, s, y, c, flags) in enumerate(BACKWARD_VARIANTS):
        block_m, block_n, warps = K.backward_blocks(d_model)
        sizes = dict(BLOCK_M=block_m, BLOCK_N=block_n)
        for floats in FLOAT_TYPES if i == 0 else FLOAT_TYPES[:1]:
            signature = _backward_signature(s, y, c, floats)
            kernel = K._bias_ffn_norms_bwd_kernel
            print(compile_for_h100(kernel, signature, {**sizes, **flags}, num_warps=warps), floats)


@needs_ptxas
def test_every_kernel_variant_compiles_for_h100():
    out = build_in_subprocess("tests.kernels.test_bias_ffn_norms_gpu_build")
    extra = 2 * (len(FLOAT_TYPES) - 1)  # the first variant of each kernel, with fp64 floats
    assert out.count("built ") == len(FORWARD_VARIANTS) + len(BACKWARD_VARIANTS) + extra, out
    print(out)
