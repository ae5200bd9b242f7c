"""Hypothesis profiles and suite-wide settings for the test suite (markers
live in the root conftest.py).

Choose with ``--hypothesis-profile NAME`` or WMFAST_HYPOTHESIS_PROFILE:
  ci   small and derandomized: fits CI's 2 CPU cores (the default under CI=true)
  dev  the default on a developer machine
  gpu  large: for a machine with a GPU and time to spare
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from wmfast.ops import rotary_eager, tail_eager

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


@pytest.fixture(autouse=True, scope="session")
def small_models_take_the_eager_functions():
    """The tests' models are far below the sizes from which the fast CPU
    training step takes the reordered projection (rotary_eager) and the
    row-sparse tail (tail_eager); lift the thresholds so they exercise what
    real sizes take (tests of a threshold itself set it back)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rotary_eager, "MIN_FUSED_TOKENS", 0)
        patch.setattr(tail_eager, "MIN_D_MODEL", 0)
        patch.setattr(tail_eager, "MIN_TOKENS", 0)
        yield
