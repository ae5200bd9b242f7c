"""Host overhead per call: what a call costs when the work itself is nearly nothing.

A tiny transformer (B 2, T 8, d_model 16, 2 layers, rotary_qk) leaves almost
only the host's share of a call: Python, dispatch, Dynamo's guards, kernel
launches. Where a step is launch-bound (the "small" GPU shape) this share is
the step. The fast variant runs compiled here on every device
(``compile="always"``; the CPU rule would run the training step eagerly), so
the difference to torch.compile(reference) is the fast runner's own per-call
work: the input check, the trace and hook checks, gathering the weights and
picking the compiled graph. Groups: ``overhead/{direction}/{device}``.
"""

from __future__ import annotations

import pytest
import torch

from wmfast.fast import make_fast

from .bench_models import build_impl, sir_batch, timed_call
from .timing import time_it

MODEL = "transformer/rotary_qk"
FIELDS = dict(d_model=16, n_heads=2, n_layers=2, d_mlp=0, dropout=0.1, d_hidden=16)
BATCH, TRIALS = 2, 2  # T = 4 * TRIALS = 8
IMPLS = ["reference", "torch_compile", "fast_compiled"]
CALLS = 50  # per timed round: each call takes well under a millisecond of work


def _impl(impl: str, device: torch.device):
    if impl == "fast_compiled":
        return make_fast(build_impl(MODEL, "reference", FIELDS, device), compile="always")
    return build_impl(MODEL, impl, FIELDS, device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", ["forward", "train_step"])
def bench_overhead(benchmark, device, smoke, direction, impl):
    benchmark.group = f"overhead/{direction}/{device.type}"
    batch = sir_batch(BATCH, TRIALS, device)
    fn = timed_call(_impl(impl, device), direction, batch, "fp32")
    time_it(
        benchmark,
        fn,
        device,
        calls=1 if smoke else CALLS,
        rounds=10,
        model=MODEL,
        impl=impl,
        direction=direction,
        shape="tiny_overhead",
        dtype="fp32",
        batch=BATCH,
        seq_len=batch.input_ids.shape[1],
        **FIELDS,
    )
