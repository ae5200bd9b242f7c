"""GPU-correct timing for the benchmark suites, and what each result records.

``time_it`` uses pytest-benchmark's pedantic mode: one untimed warm-up round
first (compiles, autotuning, the allocator), then rounds of ``calls``
back-to-back calls ending in ``torch.cuda.synchronize()`` inside the timed
region, so a round measures finished GPU work. The per-call median, GB/s or
tokens/s go into ``extra_info``, with the device, torch, triton and CUDA versions.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch

from wmfast.speed import alternating_medians, synchronize


def environment() -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_threads"] = torch.get_num_threads()
        info["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    return info


def kernel_calls_per_round(device: torch.device, numel: int) -> int:
    """Back-to-back calls per timed round of a kernel benchmark over ``numel``
    elements: enough that one synchronize per round is noise, and at least 10
    on CUDA: with one call per round the host's time to dispatch the op adds
    to the kernel's instead of overlapping the previous call (H100, SIR shape,
    bf16: wmfast's eager rotary op took 0.51 ms a call at 1 call per round,
    its kernel alone 0.29 ms; tools/rotary_tune.py)."""
    return max(10, min(50, 50_000_000 // max(numel, 1))) if device.type == "cuda" else 1


def time_it(
    benchmark,
    fn: Callable[[], object],
    device: torch.device,
    *,
    calls: int = 1,
    rounds: int | None = None,
    bytes_per_call: int | None = None,
    tokens_per_call: int | None = None,
    **info,
) -> None:
    """Benchmark ``fn`` (``calls`` calls per timed round) and record what was measured."""

    def one_round() -> None:
        for _ in range(calls):
            fn()
        synchronize(device)

    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(info, calls_per_round=calls)
    if rounds is None:
        rounds = 20 if device.type == "cuda" else 3
    started = time.perf_counter()
    one_round()  # warm-up outside the timed region: compiles happen here
    benchmark.extra_info["first_round_s"] = time.perf_counter() - started
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    per_call = benchmark.stats.stats.median / calls
    benchmark.extra_info["median_per_call_s"] = per_call
    if bytes_per_call:
        benchmark.extra_info["bytes_per_call"] = bytes_per_call
        benchmark.extra_info["gb_per_s"] = bytes_per_call / per_call / 1e9
    if tokens_per_call:
        benchmark.extra_info["tokens_per_s"] = tokens_per_call / per_call


def alternating_speedup(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    device: torch.device,
    rounds: int,
) -> float:
    """median time of ``baseline`` / median time of ``candidate``, the two called
    in turn (each warmed up first), so slow spells of the machine hit both: the
    measurement ``wmfast check`` makes."""
    for fn in (baseline, candidate):
        fn()
    baseline_s, candidate_s = alternating_medians(baseline, candidate, device, rounds)
    return baseline_s / candidate_s
