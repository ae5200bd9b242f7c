"""Host overhead per call: what a call costs when the work itself is nearly nothing.

A tiny transformer (B 2, T 8, d_model 16, 2 layers, rotary_qk) leaves almost
only the host's share of a call: Python, dispatch, Dynamo's guards, kernel
launches. Where a step is launch-bound (the "small" GPU shape) this share is
the step. The fast variant runs compiled here on every device
(``compile="always"``; the CPU rule would run the training step eagerly), so
the difference to torch.compile(reference) is the fast runner's own per-call
work: the input check, the trace and hook checks, gathering the weights and
picking the compiled graph. The tiny RNN and LSTM (same sizes) time the
recurrent fast variant's runner against the reference's call: it runs the
reference's modules for most calls (no grad, CUDA) and must cost ~nothing
there. Groups: ``overhead/{model}/{direction}/{device}``.

On CUDA two more rows split fast's extra host time ("h100-3": training step
4.96 ms against torch.compile's 4.21, forward 0.42 against 0.34) between the
runner and wmfast's Triton kernels, which Inductor launches as user-defined
kernels through Triton's own launcher, not the static launcher it uses for
its own kernels (``static_launch_user_defined_triton_kernels``, off by
default in torch 2.11-2.13): ``fast_compiled_torch_kernels`` runs the same
math with Inductor's code for the rotation and the add & norms, and
``fast_compiled_static_launch`` compiles fast's code with that option on.
``fast_compiled_cpp_wrapper`` compiles it with Inductor's C++ wrapper, which
launches every kernel from C++ instead of Python.
"""

from __future__ import annotations

import pytest
import torch

from wmfast.fast import make_fast

from .bench_models import build_impl, compile_anew_with, sir_batch, timed_call
from .timing import alternating_speedup, time_it

TRANSFORMER = "transformer/rotary_qk"
FIELDS = dict(d_model=16, n_heads=2, n_layers=2, d_mlp=0, dropout=0.1, d_hidden=16)
BATCH, TRIALS = 2, 2  # T = 4 * TRIALS = 8
TRANSFORMER_IMPLS = [
    "reference",
    "torch_compile",
    "fast_compiled",
    "fast_compiled_torch_kernels",
    "fast_compiled_static_launch",
    "fast_compiled_cpp_wrapper",
]
# Inductor settings the last two compile fast's code with (compile_anew_with).
# The static launcher is strict: a kernel that it cannot launch fails the
# case with Inductor's reason, instead of falling back to the row it is
# compared with.
INDUCTOR_PATCHES = {
    "fast_compiled_static_launch": dict(
        static_launch_user_defined_triton_kernels=True, strict_static_cuda_launcher=True
    ),
    "fast_compiled_cpp_wrapper": dict(cpp_wrapper=True),
}
RECURRENT_IMPLS = ["reference", "fast"]  # the compile options do not apply to them
CASES = [(TRANSFORMER, impl) for impl in TRANSFORMER_IMPLS] + [
    (model, impl) for model in ("rnn", "lstm") for impl in RECURRENT_IMPLS
]
CALLS = 50  # per timed round: each call takes well under a millisecond of work
ALTERNATING_ROUNDS = 50


def _impl(model: str, impl: str, device: torch.device):
    if impl in ("reference", "torch_compile", "fast"):
        return build_impl(model, impl, FIELDS, device)
    reference = build_impl(model, "reference", FIELDS, device)
    if impl == "fast_compiled_torch_kernels":
        return make_fast(reference, compile="always", rotary="torch", norm="torch")
    return make_fast(reference, compile="always")  # fast_compiled(_static_launch, _cpp_wrapper)


@pytest.mark.parametrize("model, impl", CASES)
@pytest.mark.parametrize("direction", ["forward", "train_step"])
def bench_overhead(benchmark, device, smoke, direction, model, impl):
    if impl in ("fast_compiled_torch_kernels", *INDUCTOR_PATCHES) and device.type != "cuda":
        pytest.skip(
            "rows about CUDA's launch path (the C++ wrapper's CPU numbers: "
            "bench/results/README.md, stop 33)"
        )
    benchmark.group = f"overhead/{model}/{direction}/{device.type}"
    batch = sir_batch(BATCH, TRIALS, device)
    fn = timed_call(_impl(model, impl, device), direction, batch, "fp32")
    if impl in INDUCTOR_PATCHES:
        compile_anew_with(fn, **INDUCTOR_PATCHES[impl])
    time_it(
        benchmark,
        fn,
        device,
        calls=1 if smoke else CALLS,
        rounds=10,
        model=model,
        impl=impl,
        direction=direction,
        shape="tiny_overhead",
        dtype="fp32",
        batch=BATCH,
        seq_len=batch.input_ids.shape[1],
        **FIELDS,
    )
    if impl != "reference" and not smoke:
        # the same guard against slow spells as in bench_models
        reference = timed_call(_impl(model, "reference", device), direction, batch, "fp32")
        benchmark.extra_info["alternating_speedup"] = alternating_speedup(
            reference, fn, device, ALTERNATING_ROUNDS
        )
