"""The Triton rotary kernels go through the real GPU compiler, on any machine
(why and how: tests/kernels/gpu_build.py)."""

from __future__ import annotations

import pytest

from .gpu_build import build_in_subprocess, compile_for_h100, needs_ptxas

pytestmark = pytest.mark.triton

POINTER_DTYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}

# (head_dim, dtype, CONJ): non-power-of-two and the largest head dim, each
# storage dtype, and the backward (negative angle) form
ROTARY_QK_VARIANTS = [
    (48, "float32", False),
    (48, "float16", False),
    (48, "bfloat16", False),
    (80, "bfloat16", True),
    (128, "bfloat16", True),
    (256, "float32", False),
    (256, "bfloat16", True),
]
# (head_dim, dtype): the packed gradient (rotary_qkv_packed's backward)
PACKED_GRAD_VARIANTS = [(128, "bfloat16"), (64, "bfloat16"), (48, "float32")]
# (d_model, dtype, ADD_INPUT, CONJ)
EMBEDDING_ROTATION_VARIANTS = [
    (512, "float32", True, False),
    (512, "bfloat16", False, True),
    (96, "float16", True, True),
]


def _signature(kernel, dtype: str, floats: str = "fp32") -> dict:
    """Triton's signature for ``kernel``: by the kernels' naming, ``*_ptr``
    arguments point to storage (``cos``/``sin``: the fp32 tables), upper-case
    ones are the compile-time flags, ``scale`` is a float (``floats``: fp32 as
    triton types it, fp64 as Inductor's wrapper does) and the rest are integers."""
    signature = {}
    for name in kernel.arg_names:
        if name.isupper():
            continue  # compile_for_h100 marks the flags it is given
        if name.endswith("_ptr"):
            signature[name] = "*fp32" if name in ("cos_ptr", "sin_ptr") else POINTER_DTYPES[dtype]
        else:
            signature[name] = floats if name == "scale" else "i32"
    return signature


def build_all() -> None:
    """Compile every variant; print one line per kernel built (run in the subprocess)."""
    import triton

    from wmfast.kernels import rotary as K

    def build(kernel, dtype, floats="fp32", num_warps=4, **flags):
        signature = _signature(kernel, dtype, floats)
        print(compile_for_h100(kernel, signature, flags, num_warps), dtype, floats)

    for head_dim, dtype, conj in ROTARY_QK_VARIANTS:
        block_half, block_h, num_warps = K.rotary_qk_blocks(head_dim // 2, heads=4)
        build(
            K._rotary_qk_kernel, dtype, num_warps=num_warps,
            HALF=head_dim // 2, BLOCK_HALF=block_half, BLOCK_H=block_h, CONJ=conj,
        )  # fmt: skip
    for head_dim, dtype in PACKED_GRAD_VARIANTS:
        block_half, block_h, num_warps = K.rotary_qk_blocks(head_dim // 2, heads=4)
        build(
            K._rotary_qk_packed_grad_kernel, dtype, num_warps=num_warps,
            HALF=head_dim // 2, BLOCK_HALF=block_half, BLOCK_H=block_h,
        )  # fmt: skip
    for i, (d_model, dtype, add_input, conj) in enumerate(EMBEDDING_ROTATION_VARIANTS):
        for floats in ("fp32", "fp64") if i == 0 else ("fp32",):  # fp64: inside torch.compile
            build(
                K._embedding_rotation_kernel, dtype, floats,
                HALF=d_model // 2, BLOCK_HALF=triton.next_power_of_2(d_model // 2),
                ADD_INPUT=add_input, CONJ=conj,
            )  # fmt: skip


@needs_ptxas
def test_every_kernel_variant_compiles_for_h100():
    out = build_in_subprocess("tests.kernels.test_rotary_gpu_build")
    built = out.count("built ")
    # + 1: the first embedding rotation variant again, with an fp64 scale
    variants = (
        len(ROTARY_QK_VARIANTS) + len(PACKED_GRAD_VARIANTS) + len(EMBEDDING_ROTATION_VARIANTS)
    )
    assert built == variants + 1, out
