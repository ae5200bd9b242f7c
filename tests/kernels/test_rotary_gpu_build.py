"""The Triton rotary kernels go through the real GPU compiler, on any machine.

The other kernel tests run under the Triton interpreter when there is no GPU,
and the interpreter accepts code that Triton's compiler rejects (types,
layouts, register limits). Here each kernel variant the launchers can pick is
compiled ahead of time for an H100 (sm_90: TTIR -> TTGIR -> LLVM -> PTX ->
cubin through the ptxas that ships with triton), no GPU needed. It runs in a
subprocess because kernels decorated under TRITON_INTERPRET=1 (this test
process, without a GPU) cannot be compiled.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton

H100 = ("cuda", 90, 32)  # backend, compute capability, warp size
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
# (d_model, dtype, ADD_INPUT, CONJ)
EMBEDDING_ROTATION_VARIANTS = [
    (512, "float32", True, False),
    (512, "bfloat16", False, True),
    (96, "float16", True, True),
]


def _signature(kernel, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Triton's signature for ``kernel``: by the kernels' naming, ``*_ptr``
    arguments point to storage (``cos``/``sin``: the fp32 tables), upper-case
    ones are the compile-time flags and the rest are integers."""
    signature, values = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name.isupper():
            signature[name] = "constexpr"
            values[(index,)] = constexprs.pop(name)
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in ("cos_ptr", "sin_ptr") else POINTER_DTYPES[dtype]
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    assert not constexprs, f"flags the kernel does not take: {constexprs}"
    return signature, values


def build_all() -> None:
    """Compile every variant; print one line per kernel built (run in the subprocess)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from wmfast.kernels import rotary as K

    target = GPUTarget(*H100)

    def build(kernel, dtype, **flags):
        flags_text = " ".join(f"{k}={v}" for k, v in flags.items())
        signature, constexprs = _signature(kernel, dtype, flags)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target)
        assert compiled.asm["cubin"], "ptxas produced no cubin"
        print("built", kernel.fn.__name__, dtype, flags_text)

    for head_dim, dtype, conj in ROTARY_QK_VARIANTS:
        block_half, block_h = K.rotary_qk_blocks(head_dim // 2, heads=4)
        build(
            K._rotary_qk_kernel, dtype,
            HALF=head_dim // 2, BLOCK_HALF=block_half, BLOCK_H=block_h, CONJ=conj,
        )  # fmt: skip
    for d_model, dtype, add_input, conj in EMBEDDING_ROTATION_VARIANTS:
        build(
            K._embedding_rotation_kernel, dtype,
            HALF=d_model // 2, BLOCK_HALF=triton.next_power_of_2(d_model // 2),
            ADD_INPUT=add_input, CONJ=conj,
        )  # fmt: skip


def _ptxas_available() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend (ptxas) is missing")
def test_every_kernel_variant_compiles_for_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", "from tests.kernels.test_rotary_gpu_build import build_all; build_all()"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    built = done.stdout.count("built ")
    assert built == len(ROTARY_QK_VARIANTS) + len(EMBEDDING_ROTATION_VARIANTS), done.stdout
