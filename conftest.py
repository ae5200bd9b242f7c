"""Root pytest setup shared by tests/ and bench/: the Triton interpreter switch
and the hardware markers (declared in pyproject.toml).

  cuda     skipped unless a CUDA device is present
  triton   skipped unless triton is importable
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
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
