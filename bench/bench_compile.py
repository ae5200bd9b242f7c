"""Cold and warm compile cost of the fast variant, as a sweep's processes pay it.

Each case starts a new Python process that builds a fast model, calls it once
(the call that compiles) and then a few more times. "cold" runs it against an
empty ``TORCHINDUCTOR_CACHE_DIR``; "warm" first runs it once untimed against a
fresh directory, then times a second process that finds that directory full:
the situation of every process after the first in a sweep that shares one
cache directory. Timed (the benchmark's median): the whole process, imports
included; ``extra_info``: ``first_round_s`` (the first call alone) and
``step_s`` (the median of the calls after it), so compile cost sits beside the
step time it buys.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wmfast.speed import call_seconds

from .bench_models import SHAPES, build_impl, one_case_shape, sir_batch, timed_call
from .timing import environment

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["transformer/rotary_qk", "transformer/standard"]
STEPS_AFTER_FIRST = 5


def _child(model: str, direction: str, shape: str, dtype: str) -> dict:
    """Runs in the new process: first call, then steady calls."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size, trials, fields = SHAPES[shape]
    fn = timed_call(
        build_impl(model, "fast", fields, device),
        direction,
        sir_batch(batch_size, trials, device),
        dtype,
    )
    first = call_seconds(fn, device)
    steps = [call_seconds(fn, device) for _ in range(STEPS_AFTER_FIRST)]
    return {"first_round_s": first, "step_s": statistics.median(steps)}


def _run_child(cache_dir: Path, *args: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_compile", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"compile-time child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("direction", ["train_step", "forward"])
@pytest.mark.parametrize("model", MODELS)
def bench_compile(benchmark, device, smoke, tmp_path, model, direction, cache):
    if smoke and (model, direction, cache) != (MODELS[0], "forward", "cold"):
        pytest.skip("the smoke run starts one process, not the whole matrix")
    shape, dtype = one_case_shape(device, smoke)
    args = (model, direction, shape, dtype)
    if cache == "warm":
        _run_child(tmp_path, *args)  # fills the cache, untimed
    benchmark.group = f"compile/{direction}/{shape}/{dtype}/{model}"
    result = {}
    benchmark.pedantic(lambda: result.update(_run_child(tmp_path, *args)), rounds=1, iterations=1)
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(
        result, impl=f"fast_{cache}", model=model, direction=direction, shape=shape, dtype=dtype
    )


if __name__ == "__main__":
    print(json.dumps(_child(*sys.argv[1:5])))
