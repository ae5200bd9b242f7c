"""Benchmark plumbing shared by the bench_*.py suites (timing: bench/timing.py).

With ``WMFAST_BENCH_PARTIAL=path.jsonl`` each result is appended to that file
as its test finishes, so a run that is cut short still leaves numbers.

On CPU the suites run tiny shapes: a smoke run (``--benchmark-disable``) in CI
checks that every benchmark still runs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    """True under --benchmark-disable (CI): run every benchmark once, at tiny shapes."""
    return bool(request.config.getoption("benchmark_disable", False))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    path = os.environ.get("WMFAST_BENCH_PARTIAL")
    if not path or call.when != "call":
        return
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is None or bench.stats is None:
        return
    stats = bench.stats.stats
    record = {
        "name": item.name,
        "group": bench.group,
        "extra_info": bench.extra_info,
        "stats": {
            k: getattr(stats, k) for k in ("min", "max", "mean", "median", "stddev", "rounds")
        },
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
