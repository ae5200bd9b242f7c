"""Compiling Triton kernels for an H100 on a machine without a GPU.

The kernel tests run under the Triton interpreter when there is no GPU, and
the interpreter accepts code that Triton's compiler rejects (types, layouts,
register limits). The ``*_gpu_build`` tests compile each kernel variant a
launcher can pick ahead of time for an H100 (sm_90: TTIR -> TTGIR -> LLVM ->
PTX -> cubin through the ptxas that ships with triton). They compile in a
subprocess, because kernels decorated under TRITON_INTERPRET=1 (the test
process, without a GPU) cannot be compiled.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

H100 = ("cuda", 90, 32)  # backend, compute capability, warp size

needs_ptxas = pytest.mark.skipif(
    not (
        (spec := importlib.util.find_spec("triton")) is not None
        and spec.origin is not None
        and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()
    ),
    reason="triton's NVIDIA backend (ptxas) is missing",
)


def compile_for_h100(kernel, signature: dict, constexprs: dict, num_warps: int = 4) -> str:
    """Compile ``kernel`` for sm_90 (in the build subprocess); a line to print."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    values = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    compiled = triton.compile(
        ASTSource(kernel, signature, values),
        target=GPUTarget(*H100),
        options={"num_warps": num_warps},
    )
    assert compiled.asm["cubin"], "ptxas produced no cubin"
    fp64 = _fp64_math(compiled.asm["ttir"])
    assert not fp64, f"{kernel.fn.__name__} computes in fp64:\n" + "\n".join(fp64)
    flags = " ".join(f"{k}={v}" for k, v in constexprs.items()) + f" num_warps={num_warps}"
    return f"built {kernel.fn.__name__} {flags} ({_register_use(compiled.asm['ptx'])})"


def _fp64_math(ttir: str) -> list[str]:
    """The TTIR lines that compute in fp64. A float argument may arrive as fp64
    (Inductor types Python floats so); the kernels cast it to fp32 first, and
    that cast and the signature are the only f64 lines they should have."""
    return [
        line.strip()
        for line in ttir.splitlines()
        if "f64" in line and "tt.func" not in line and "arith.truncf" not in line
    ]


def _register_use(ptx: str) -> str:
    """ptxas's own report of registers per thread and spilled bytes: what a
    launch setting costs, readable without a GPU."""
    import re
    import tempfile

    bin_dir = Path(importlib.util.find_spec("triton").origin).parent / "backends/nvidia/bin"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        # triton 3.9 writes PTX 9.4, which only its second, newer ptxas reads
        for ptxas in (bin_dir / "ptxas", bin_dir / "ptxas-blackwell"):
            if not ptxas.exists():
                continue
            done = subprocess.run(
                [str(ptxas), "-v", "--gpu-name", "sm_90a", str(source), "-o", f"{tmp}/k.o"],
                capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode == 0:
                break
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores", done.stderr)
    return f"{regs[1] if regs else '?'} registers, {spills[1] if spills else '?'} bytes spilled"


def build_in_subprocess(module: str, function: str = "build_all") -> str:
    """Run ``module.function()`` in a process without TRITON_INTERPRET; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", f"from {module} import {function}; {function}()"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout
