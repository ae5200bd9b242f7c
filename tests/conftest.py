"""Hypothesis profiles for the test suite (markers live in the root conftest.py).

Choose with ``--hypothesis-profile NAME`` or WMFAST_HYPOTHESIS_PROFILE:
  ci   small and derandomized: fits CI's 2 CPU cores (the default under CI=true)
  dev  the default on a developer machine
  gpu  large: for a machine with a GPU and time to spare
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

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
