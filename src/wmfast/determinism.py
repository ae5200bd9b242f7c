"""A deterministic mode for bitwise-reproducible reruns.

On CPU, reruns of the same seed are bitwise equal without it (tested). On
CUDA, some kernels (cuBLAS split-K reductions, atomics in backward passes,
the memory-efficient attention backward) may reorder floating-point sums
between runs; ``set_deterministic(True)`` makes PyTorch pick deterministic
kernels or raise where none exists (a CUDA test holds fast training reruns to
bitwise equality in this mode). ``bench/bench_determinism.py`` measures its
cost and records whether reruns were bitwise, with and without it (2 CPU
cores: no measurable cost, 0.93-1.04x). Set it before the first CUDA work
(cuBLAS reads its workspace setting when it starts).
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"


def set_deterministic(enabled: bool = True) -> None:
    """Turn PyTorch's deterministic algorithms (and cuDNN's) on or off, process-wide."""
    if enabled:
        # cuBLAS needs a fixed workspace for deterministic results (CUDA >= 10.2)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False if enabled else torch.backends.cudnn.benchmark
