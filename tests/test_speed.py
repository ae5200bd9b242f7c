"""wmfast.speed: the alternating timing behind every speed ratio."""

from __future__ import annotations

import pytest
import torch

from wmfast import speed


@pytest.mark.parametrize(
    "pair_s, repeats",
    [(0.001, 200), (0.007, 42), (0.02, 15), (0.04, 7), (0.1, 6), (2.0, 6), (0.0, 200)],
)
def test_takes_as_many_pairs_as_fit_the_budget_within_bounds(pair_s, repeats):
    assert speed.repeats_within(0.3, pair_s) == repeats


def test_pairs_flip_which_model_goes_first():
    calls = []
    speed.alternating_medians(
        lambda: calls.append("reference"), lambda: calls.append("fast"), torch.device("cpu"), 4
    )
    assert calls == ["reference", "fast", "fast", "reference"] * 2
