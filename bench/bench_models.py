"""Model benchmarks: the reference, torch.compile(reference) and wmfast's fast
variant, per model class and positional type, training step and no-grad forward.

The training step is the real one: a Store-Ignore-Recall batch (answers every
4th token, masked to 0 in the input), forward (under bf16 autocast, or fp32),
cross-entropy at the answers from the preceding position's logits, backward,
AdamW step. Groups: ``model/{direction}/{shape}/{dtype}/{model}``; the ratio
that matters is fast vs reference within a group (same process, same run).

Shapes. CUDA: "sir" (workingmem's defaults as its sweeps run them: B 256,
T 800, d_model 512, 2 layers, 4 heads, vocab 350, d_mlp 0, dropout 0.1;
RNN/LSTM d_model 512, d_hidden 256) and "small" (launch-bound: B 64, T 200,
d_model 256). CPU: "cpu" (B 32, T 128, d_model 128, 4 heads, 2 layers, d_mlp
512, dropout 0, fp32), or "tiny" under --benchmark-disable (CI's smoke run).
On CUDA the bf16 training steps come first, so a run cut short still has them.

Every model runs with ``check_token_ids = False``, as wmfast's training loop
runs them (it checks each batch on the CPU): on CUDA the in-forward token-id
range check is a device-to-host sync per call.
"""

from __future__ import annotations

import pytest
import torch

from wmfast import ModelConfig, backends, build_model
from wmfast.fast import make_fast
from wmfast.tasks.sir import SIRConfig, SIRDataset
from wmfast.training import masked_loss, prepare_batch

from .timing import alternating_speedup, time_it

MODELS = [
    "transformer/rotary_qk",
    "transformer/rotary",
    "transformer/standard",
    "transformer/None",
    "rnn",
    "lstm",
]
IMPLS = [
    "reference",
    "torch_compile",
    "fast",
    "fast_cudagraphs",
    "fast_torch_norm",
    "fast_single_norms",
    "fast_unpacked_rotary",
    "fast_cpp_wrapper",
]

# Inductor settings that some impls compile fast's code with (compile_anew_with)
INDUCTOR_PATCHES = {
    # C++ instead of Python launching the kernels: on the 2-core CPU the tiny
    # overhead model's compiled calls took 13% (forward) and 10% (training)
    # less time against the reference (bench/results/README.md, stop 33); on
    # a launch-bound GPU step (the "small" shape) host time is the step's time
    "fast_cpp_wrapper": dict(cpp_wrapper=True),
}

# name: (batch, trials (x4 tokens), model fields)
SHAPES = {
    "sir": (256, 200, dict(d_model=512, n_heads=4, n_layers=2, d_mlp=0, dropout=0.1, d_hidden=256)),
    "small": (64, 50, dict(d_model=256, n_heads=4, n_layers=2, d_mlp=0, dropout=0.1, d_hidden=256)),
    "cpu": (32, 32, dict(d_model=128, n_heads=4, n_layers=2, d_mlp=512, dropout=0.0, d_hidden=128)),
    "tiny": (2, 4, dict(d_model=16, n_heads=2, n_layers=1, d_mlp=8, dropout=0.0, d_hidden=16)),
}


def _cases():
    if torch.cuda.is_available():
        order = [
            (direction, shape, dtype)
            for dtype in ("bf16", "fp32")
            for direction in ("train_step", "forward")
            for shape in ("sir", "small")
        ]
    else:
        order = [(direction, "cpu", "fp32") for direction in ("train_step", "forward")]
    return [
        pytest.param(
            direction, shape, dtype, model, impl, id=f"{direction}-{shape}-{dtype}-{model}-{impl}"
        )
        for direction, shape, dtype in order
        for model in MODELS
        for impl in IMPLS
    ]


def _config(model: str, fields: dict) -> ModelConfig:
    cls, _, pe = model.partition("/")
    return ModelConfig(
        model_class=cls,
        positional_embedding_type=None if pe in ("", "None") else pe,
        act_fn="tanh" if cls == "rnn" else "relu",
        d_vocab=350,
        seed=0,
        **fields,
    )


def build_impl(model: str, impl: str, fields: dict, device):
    """``model`` ("transformer/rotary_qk", "lstm", ...) as ``impl`` runs it (IMPLS)."""
    reference = build_model(_config(model, fields), variant="reference").to(device)
    reference.check_token_ids = False  # as the training loop runs it (module docstring);
    # it also spares torch.compile(reference) the graph break at that check's sync
    if impl == "reference":
        return reference
    if impl == "torch_compile":
        return torch.compile(reference)  # the peer a user would try first: default settings
    if impl in ("fast", "fast_single_norms", "fast_unpacked_rotary", "fast_cpp_wrapper"):
        # (see bench_model)
        return make_fast(reference)
    if impl == "fast_torch_norm":
        # the norm rule's alternative in compiled CUDA training: Inductor's fused
        # code for the add & norm instead of wmfast's Triton kernels
        # (bench/results/README.md, "h100-2")
        return make_fast(reference, norm="torch")
    return make_fast(reference, mode="reduce-overhead")


def compile_anew_with(fn, **inductor_patches) -> None:
    """Run ``fn`` once, compiling it anew under ``inductor_patches``
    (torch._inductor.config). Dynamo's caches are dropped first: fast models
    of one configuration share their compiled code (wmfast.fast), which
    another impl may have compiled without them. The compiled code keeps the
    settings after the patch ends: they are read when compiling."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(**inductor_patches):
        fn()


def one_case_shape(device: torch.device, smoke: bool) -> tuple[str, str]:
    """(shape, dtype) for suites that time one representative case per model:
    "small" in bf16 on CUDA, "cpu" in fp32 on CPU, "tiny" in the smoke run."""
    if device.type == "cuda":
        return "small", "bf16"
    return ("tiny" if smoke else "cpu"), "fp32"


def sir_batch(batch_size: int, trials: int, device: torch.device):
    """One Store-Ignore-Recall batch, answers masked in the input."""
    data = SIRDataset(SIRConfig(seq_len=trials, n_sequences=batch_size, seed=0))
    raw = next(iter(torch.utils.data.DataLoader(data, batch_size=batch_size)))
    return prepare_batch(raw, 350, mask_answer_tokens=True).to(device)


def training_step(net, batch, dtype: str):
    """The training step: forward (bf16 autocast or fp32), CE at the answers,
    backward, AdamW step."""
    device = batch.input_ids.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def train_step():
        with autocast:
            logits = net(batch.input_ids)
        loss, _ = masked_loss(logits, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def timed_call(net, direction: str, batch, dtype: str):
    """What one timed call runs: a training step, or a no-grad forward in eval mode."""
    net.train(direction == "train_step")
    if direction == "train_step":
        return training_step(net, batch, dtype)
    device = batch.input_ids.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def forward():
        with torch.no_grad(), autocast:
            net(batch.input_ids)

    return forward


@pytest.mark.parametrize("direction, shape, dtype, model, impl", _cases())
def bench_model(benchmark, device, smoke, monkeypatch, direction, shape, dtype, model, impl):
    if impl == "fast_cudagraphs" and device.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    if impl in ("fast_torch_norm", "fast_single_norms") and (
        device.type != "cuda" or model in ("rnn", "lstm")
    ):
        pytest.skip("the norm rule's alternatives: transformers on CUDA (CPU takes torch's)")
    if impl == "fast_unpacked_rotary" and (
        device.type != "cuda" or model != "transformer/rotary_qk"
    ):
        pytest.skip("the packed rotary gradient's alternative: rotary_qk on CUDA")
    if impl == "fast_cpp_wrapper" and (
        device.type != "cuda" or shape != "small" or model in ("rnn", "lstm")
    ):
        pytest.skip("Inductor's C++ wrapper: the launch-bound CUDA shape, compiled transformers")
    if impl == "fast_single_norms":
        # two single add & norm passes per d_mlp 0 layer instead of the fused one
        monkeypatch.setattr(backends, "FUSED_NORMS_AT_D_MLP_0", False)
    if impl == "fast_unpacked_rotary":
        # rotary_qk's gradients stacked by autograd instead of written packed
        monkeypatch.setattr(backends, "PACKED_ROTARY_QK_GRADIENT", False)
    shape = "tiny" if smoke and device.type == "cpu" else shape
    batch_size, trials, fields = SHAPES[shape]
    benchmark.group = f"model/{direction}/{shape}/{dtype}/{model}"
    batch = sir_batch(batch_size, trials, device)
    fn = timed_call(build_impl(model, impl, fields, device), direction, batch, dtype)
    if impl in INDUCTOR_PATCHES:
        compile_anew_with(fn, **INDUCTOR_PATCHES[impl])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rounds = 20 if device.type == "cuda" else 8
    time_it(
        benchmark,
        fn,
        device,
        rounds=rounds,
        tokens_per_call=batch.input_ids.numel(),
        model=model,
        impl=impl,
        direction=direction,
        shape=shape,
        dtype=dtype,
        batch=batch_size,
        seq_len=batch.input_ids.shape[1],
        **fields,
    )
    if device.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    if impl != "reference" and not smoke:
        # pytest-benchmark times the cases one after another; on a shared
        # 2-core machine a whole case can run 20-30% slow, and on a GPU the
        # launch-bound "small" shape moved as much between cases ("h100-3":
        # torch.compile's None step 5.68 ms, its rotary_qk step, which does
        # more, 4.27). Calling a reference model in turn with this one gives a
        # ratio that such spells cannot tilt.
        reference = timed_call(
            build_impl(model, "reference", fields, device), direction, batch, dtype
        )
        benchmark.extra_info["alternating_speedup"] = alternating_speedup(
            reference, fn, device, rounds
        )
