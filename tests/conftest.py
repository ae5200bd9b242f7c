"""Shared pytest setup: hypothesis profiles and the hardware markers.

Hypothesis profiles (``--hypothesis-profile NAME`` or WMFAST_HYPOTHESIS_PROFILE):
  ci   small and derandomized: fits CI's 2 CPU cores (the default under CI=true)
  dev  the default on a developer machine
  gpu  large: for a machine with a GPU and time to spare

Markers (declared in pyproject.toml):
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
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels run under the interpreter, which triton reads
# when a kernel is decorated: it must be set before wmfast.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci",
    max_examples=8,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "gpu", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(
    os.environ.get("WMFAST_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # evaluated once per session, at collection, never at import time
    reasons = {
        "cuda": None if torch.cuda.is_available() else "needs a CUDA device",
        "triton": None
        if importlib.util.find_spec("triton")
        else "needs triton (pip install wmfast[triton])",
        "nnsight": None
        if importlib.util.find_spec("nnsight")
        else "needs nnsight (pip install wmfast[interp])",
        "slow": None if config.getoption("--run-slow") else "slow: pass --run-slow",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
