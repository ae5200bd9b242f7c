"""Root pytest setup shared by tests/ and bench/: the Triton interpreter switch
and the hardware markers (declared in pyproject.toml).

  cuda     skipped unless a CUDA device is present
  triton   skipped unless triton is importable
  triton_loops  skipped where the Triton interpreter cannot run a kernel's
           runtime loop (triton < 3.7 with numpy >= 2.5; the norm backwards
           then raise an error that tests/kernels/test_triton.py checks)
  nnsight  skipped unless nnsight is importable
  slow     skipped unless --run-slow
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter, which triton reads
# when a kernel is decorated: it must be set before wmfast.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {
        "cuda": None if torch.cuda.is_available() else "needs a CUDA device",
        "triton": None
        if importlib.util.find_spec("triton")
        else "needs triton (pip install 'wmfast[triton]')",
        "nnsight": None
        if importlib.util.find_spec("nnsight")
        else "needs nnsight (pip install 'wmfast[interp]')",
        "slow": None if config.getoption("--run-slow") else "slow: pass --run-slow",
    }
    if any("triton_loops" in item.keywords for item in items):  # imports triton
        reasons["triton_loops"] = _triton_loops_skip_reason()
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def _triton_loops_skip_reason() -> str | None:
    if not importlib.util.find_spec("triton"):
        return "needs triton (pip install 'wmfast[triton]')"
    from wmfast.kernels import _triton  # after TRITON_INTERPRET is set, above

    if _triton.INTERPRETER_RUNS_LOOPS:
        return None
    import numpy
    import triton

    return (
        f"the Triton interpreter of triton {triton.__version__} cannot run a runtime loop "
        f"with numpy {numpy.__version__} (fixed in triton 3.7)"
    )
