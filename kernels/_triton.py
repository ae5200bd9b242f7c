"""The one place that imports triton, and the checks before any launch.

Importing this module imports triton (a clear ImportError if it is missing).
``TRITON_INTERPRET=1`` is read by triton when ``@triton.jit`` decorates a
kernel, i.e. when a kernel module is imported: set it before importing
``wmfast.kernels.rotary`` to run the kernels on CPU tensors.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "wmfast's Triton kernels need triton: pip install 'wmfast[triton]'. "
        "Without it, use the pure-torch path (wmfast.functional.rotary_qk, "
        "wmfast.functional.embedding_rotation)."
    ) from exc

# Read once, like triton itself: kernels are decorated at import in this mode.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def fp32(value):
    """A float argument as fp32. Triton types a Python float fp32 when it launches
    a kernel itself, but Inductor's wrapper types it fp64 (torch >= 2.11), which
    would turn the math around it into fp64: slower, and a loop-carried fp32
    accumulator then fails to compile."""
    return tl.cast(value, tl.float32)


def check_device(*tensors: torch.Tensor) -> None:
    """Every tensor on one device, and a device the kernels can run on."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "wmfast's Triton kernels got CPU tensors, but the Triton interpreter is off: "
            "set TRITON_INTERPRET=1 before wmfast.kernels is imported, move the tensors "
            "to CUDA, or use the pure-torch path (wmfast.functional)"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"wmfast's Triton kernels run on CUDA (or CPU, interpreted); got {device}"
        )


def check_dtype(name: str, tensor: torch.Tensor, allowed=STORAGE_DTYPES) -> None:
    if tensor.dtype not in allowed:
        raise TypeError(f"{name} must be one of {[str(d) for d in allowed]}; got {tensor.dtype}")
