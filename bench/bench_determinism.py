"""What ``wmfast.set_deterministic(True)`` costs, and whether reruns are bitwise.

Per model: the fast variant's training step with the default kernels and in
deterministic mode (same process, same shape), at the "small" shape on CUDA
(bf16) and the "cpu" shape on CPU (fp32). Each case also records in
``extra_info["rerun_bitwise"]`` whether two runs of a few training steps from
the same weights end with bitwise equal weights: the per-device statement the
docs make about reproducibility comes from this field.
"""

from __future__ import annotations

import pytest
import torch

import wmfast

from .bench_models import SHAPES, build_impl, one_case_shape, sir_batch, training_step
from .timing import time_it

MODELS = ["transformer/rotary_qk", "transformer/standard", "lstm"]
RERUN_STEPS = 3


def _weights_after_steps(model: str, fields: dict, device, batch, dtype: str) -> list[torch.Tensor]:
    net = build_impl(model, "fast", fields, device).train()
    step = training_step(net, batch, dtype)
    torch.manual_seed(0)  # the same dropout masks in both runs
    for _ in range(RERUN_STEPS):
        step()
    return [p.detach().clone() for p in net.parameters()]


def _reruns_bitwise(model: str, fields: dict, device, batch, dtype: str) -> bool:
    first = _weights_after_steps(model, fields, device, batch, dtype)
    second = _weights_after_steps(model, fields, device, batch, dtype)
    return all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.fixture
def deterministic_mode(request):
    """set_deterministic for one case, restoring PyTorch's defaults afterwards."""
    enabled = request.param
    wmfast.set_deterministic(enabled)
    try:
        yield enabled
    finally:
        wmfast.set_deterministic(False)


@pytest.mark.parametrize(
    "deterministic_mode", [False, True], indirect=True, ids=["default", "deterministic"]
)
@pytest.mark.parametrize("model", MODELS)
def bench_determinism(benchmark, device, smoke, model, deterministic_mode):
    shape, dtype = one_case_shape(device, smoke)
    batch_size, trials, fields = SHAPES[shape]
    benchmark.group = f"determinism/train_step/{shape}/{dtype}/{model}"
    batch = sir_batch(batch_size, trials, device)
    net = build_impl(model, "fast", fields, device).train()
    impl = "fast_deterministic" if deterministic_mode else "fast"
    time_it(
        benchmark,
        training_step(net, batch, dtype),
        device,
        rounds=20 if device.type == "cuda" else 5,
        tokens_per_call=batch.input_ids.numel(),
        model=model,
        impl=impl,
        direction="train_step",
        shape=shape,
        dtype=dtype,
        deterministic=deterministic_mode,
    )
    benchmark.extra_info["rerun_bitwise"] = _reruns_bitwise(model, fields, device, batch, dtype)
