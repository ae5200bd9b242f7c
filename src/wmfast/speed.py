"""Speed ratios on a noisy machine: two callables timed in turn.

The machines this package runs on (2 shared CPU cores, a GPU behind a busy
host) change speed from one second to the next, so a ratio of two medians
taken one after another can move by 30%. Calling the two in turn, pair by
pair, lets a slow spell hit both alike. ``wmfast check`` and the benchmark
suites (bench/timing.py) take their ratios from here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call, synchronised on CUDA so it counts finished work."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternating_medians(
    baseline: Callable[[], Any], candidate: Callable[[], Any], device: torch.device, repeats: int
) -> tuple[float, float]:
    """Median seconds of ``baseline`` and of ``candidate``, called in turn
    ``repeats`` times, so slow spells of the machine hit both alike; which of
    the two goes first flips every pair, so neither always runs in the wake
    of the other (its freed memory, its cache). Warm both up first (compiles
    must happen outside)."""
    baseline_times, candidate_times = [], []
    for i in range(repeats):
        pair = ((baseline, baseline_times), (candidate, candidate_times))
        for fn, times in pair if i % 2 == 0 else reversed(pair):
            times.append(call_seconds(fn, device))
    return statistics.median(baseline_times), statistics.median(candidate_times)


def repeats_within(budget_s: float, pair_s: float, least: int = 6, most: int = 200) -> int:
    """How many alternating pairs fit in ``budget_s`` when one pair takes
    ``pair_s``: small models take milliseconds a call, and a median of 5 such
    calls moved by 10% from run to run on a busy machine (a model against
    itself: 0.95-1.04x at 5 pairs of a 70 ms CPU training step)."""
    fit = int(budget_s / pair_s) if pair_s > 0 else most
    return max(least, min(most, fit))
