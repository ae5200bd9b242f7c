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


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def _interpreter_runs_loops() -> bool:
    """Whether the interpreter can run a loop over a runtime range. Triton < 3.7
    turns a loop bound into a Python int with int() of a 1-element array,
    which numpy >= 2.5 refuses ("only 0-dimensional arrays can be converted to
    Python scalars"); triton 3.7 squeezes the array first. Torch 2.11 pins
    triton 3.6."""
    if not INTERPRETED or _major_minor(triton.__version__) >= (3, 7):
        return True
    import numpy  # the interpreter's own dependency

    return _major_minor(numpy.__version__) < (2, 5)


INTERPRETER_RUNS_LOOPS = _interpreter_runs_loops()

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def fp32(value):
    """A float argument as fp32. Triton types a Python float fp32 when it launches
    a kernel itself, but Inductor's wrapper types it fp64 (torch >= 2.11), which
    would turn the math around it into fp64: slower, and a loop-carried fp32
    accumulator then fails to compile."""
    return tl.cast(value, tl.float32)


def cdiv(a, b):
    """ceil(a / b) for the launchers' grids and blocks. Plain integer math:
    triton's own (a ConstexprFunction in triton 3.6) took 1.3 us a call,
    which an eager launch pays two or three times on its host path; this
    also works on the SymInts a launcher sees under torch.compile."""
    return (a + b - 1) // b


def next_power_of_2(n):
    """The least power of two >= n: triton.next_power_of_2's bit operations
    (the same values, SymInts too), without its ConstexprFunction's per-call
    cost (see cdiv)."""
    n -= 1
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1


def no_wrap(kernel):
    """A launcher's ``wrap`` for plain launches: the kernel itself. Registered
    triton_ops pass ``torch.library.wrap_triton`` instead, so Inductor sees it."""
    return kernel


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


def check_interpreter_runs_loops(kernel: str) -> None:
    """For kernels that loop over a runtime range of rows: a clear error where
    the interpreter cannot run them (``_interpreter_runs_loops``)."""
    if not INTERPRETER_RUNS_LOOPS:
        import numpy

        raise RuntimeError(
            f"{kernel} cannot run under the Triton interpreter of triton {triton.__version__} "
            f"with numpy {numpy.__version__}: triton < 3.7 interprets its row loop with a "
            f"conversion numpy >= 2.5 refuses. Install triton >= 3.7 or numpy < 2.5, run on "
            f"CUDA, or use norm='torch'"
        )


def check_dtype(name: str, tensor: torch.Tensor, allowed=STORAGE_DTYPES) -> None:
    if tensor.dtype not in allowed:
        raise TypeError(f"{name} must be one of {[str(d) for d in allowed]}; got {tensor.dtype}")
