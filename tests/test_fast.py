"""The fast variant computes what the reference computes: logits and every
parameter gradient, on drawn configs and inputs, in every mode; and it keeps
the reference's module tree, checkpoints and behaviour under casts and copies.

Paths and what pays for them on CPU:
* grad enabled -> the uncompiled functional path (cheap: hypothesis draws configs);
* no grad      -> the compiled path (a compile per config: a few fixed configs,
                  hypothesis draws the token ids);
* rotary="triton" -> the Triton kernels, under the interpreter on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import pickle

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from wmfast import backends, build_model
from wmfast import fast as wf
from wmfast import functional as WF
from wmfast.check import answer_rows, cudnn_off_for_eval_rnn_backward
from wmfast.fast import FastOptions, describe, make_fast, make_reference
from wmfast.models.transformer_functional import fast_path_mismatch
from wmfast.ops import mlp_eager, output_layer_eager, rnn_eager, rotary_eager, tail_eager

from .helpers import (
    AUTOCAST_LOGITS,
    DEVICES,
    FP32_GRADS,
    FP32_LOGITS,
    POSITIONAL_TYPES,
    HalvedForward,
    RecordOps,
    assert_as_close_to_fp64_as_the_reference,
    count_applies,
    grads_across_relu_kinks,
    kernel_device,
    random_ids,
    reference_and_fast,
    reference_model,
    small_config,
)

# -- drawn configs --------------------------------------------------------------------


@st.composite
def model_configs(draw, transformer_only=False):
    cls = (
        "transformer"
        if transformer_only
        else draw(st.sampled_from(["transformer"] * 4 + ["rnn", "lstm"]))
    )
    if cls != "transformer":
        return small_config(
            model_class=cls,
            act_fn=draw(st.sampled_from(["relu", "tanh"])) if cls == "rnn" else "relu",
            n_layers=draw(st.integers(1, 3)),
            d_model=draw(st.integers(1, 24)),
            d_hidden=draw(st.integers(1, 24)),
            d_vocab=draw(st.integers(2, 60)),
            seed=draw(st.integers(0, 2**16)),
        )
    pe = draw(st.sampled_from(POSITIONAL_TYPES))
    heads = draw(st.integers(1, 4))
    # head dims: odd ones (not for rotary_qk, which pairs features) and non-powers of two
    head_dim = draw(
        st.sampled_from([2, 4, 6, 10, 12] if pe == "rotary_qk" else [1, 3, 4, 5, 6, 12])
    )
    d_model = heads * head_dim
    if pe == "rotary" and d_model % 2:
        d_model, heads = 2 * d_model, 2 * heads
    return small_config(
        positional_embedding_type=pe,
        n_heads=heads,
        d_model=d_model,
        n_layers=draw(st.integers(1, 3)),
        d_mlp=draw(st.sampled_from([0, 7, 32])),
        act_fn=draw(st.sampled_from(["relu", "gelu"])),
        d_vocab=draw(st.integers(2, 60)),
        seed=draw(st.integers(0, 2**16)),
    )


shapes = st.tuples(st.integers(1, 3), st.sampled_from([1, 2, 5, 9, 16]))


def _grads(model, logits, weight):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad((logits * weight).sum(), params, allow_unused=True)


def assert_same_function(reference, fast, ids, *, train=False, check_grads=True):
    """Logits and every parameter gradient of ``fast`` match ``reference``."""
    reference.train(train)
    fast.train(train)
    ids = ids.to(next(reference.parameters()).device)
    backward = cudnn_off_for_eval_rnn_backward(reference, ids.device, train)
    with backward if check_grads else contextlib.nullcontext():
        _assert_same_function(reference, fast, ids, check_grads)


def _assert_same_function(reference, fast, ids, check_grads):
    want = reference(ids)
    got = fast(ids)
    torch.testing.assert_close(got, want, **FP32_LOGITS)
    if not check_grads:
        return
    weight = torch.randn(want.shape, generator=torch.Generator().manual_seed(7)).to(want.device)
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    got_grads = _grads(fast, got, weight)
    want_grads = grads_across_relu_kinks(
        reference,
        lambda: _grads(reference, reference(ids), weight),
        got_grads,
        _grads(reference, want, weight),
        FP32_GRADS,
    )
    for name, g_ref, g_fast in zip(names, want_grads, got_grads, strict=True):
        if g_ref is None or g_fast is None:
            assert g_ref is None and g_fast is None, name
            continue
        torch.testing.assert_close(g_fast, g_ref, **FP32_GRADS, msg=lambda m, n=name: f"{n}: {m}")


# -- the uncompiled path: drawn configs ----------------------------------------------
# compile="never": the functional path without a compile per draw (on CPU with
# grad enabled the rule compiles nothing anyway); on CUDA it runs the Triton
# rotary kernels eagerly.


@pytest.mark.parametrize("device", DEVICES)
@given(model_configs(), shapes, st.integers(0, 2**31 - 1))
def test_fast_equals_reference_eval_with_grad(device, config, shape, seed):
    reference, fast = reference_and_fast(config, device, compile="never")
    assert_same_function(reference, fast, random_ids(seed, config.d_vocab, *shape))


@pytest.mark.parametrize("device", DEVICES)
@given(model_configs(), shapes, st.integers(0, 2**31 - 1))
def test_fast_equals_reference_train_without_dropout(device, config, shape, seed):
    reference, fast = reference_and_fast(config.replace(dropout=0.0), device, compile="never")
    assert_same_function(reference, fast, random_ids(seed, config.d_vocab, *shape), train=True)


@pytest.mark.parametrize("device", DEVICES)
@given(model_configs(transformer_only=True), shapes, st.integers(0, 2**31 - 1))
def test_fast_equals_reference_under_no_grad_uncompiled(device, config, shape, seed):
    # Under no_grad the reference takes PyTorch's fused encoder path, which on
    # CUDA lies up to 3e-4 from PyTorch's own unfused path at tiny head dims
    # (H100, torch 2.11: d_model 6, 2 heads; 1.6e-6 at d_model 512;
    # tools/fused_path_diff.py). So: within 1e-5 of the reference's unfused
    # output, and no farther from the fused output than that unfused one is.
    reference, fast = reference_and_fast(config, device, compile="never")
    ids = random_ids(seed, config.d_vocab, *shape).to(device)
    reference.eval(), fast.eval()
    unfused = reference(ids).detach()
    with torch.no_grad():
        got, fused = fast(ids), reference(ids)
    torch.testing.assert_close(got, unfused, **FP32_LOGITS)
    own_gap = (unfused - fused).abs().max()
    assert (got - fused).abs().max() <= own_gap + FP32_LOGITS["atol"]


# -- the kernel path: Triton rotary kernels inside the model ---------------------------


@pytest.mark.triton
@given(
    st.sampled_from(["rotary", "rotary_qk"]),
    st.sampled_from([(2, 4), (4, 2), (3, 6)]),  # (heads, head_dim): non-power-of-two dims too
    st.sampled_from([1, 5, 7]),
    st.integers(0, 2**31 - 1),
)
def test_fast_with_triton_rotary_equals_reference(pe, heads_dim, seq_len, seed):
    heads, head_dim = heads_dim
    config = small_config(
        positional_embedding_type=pe,
        n_heads=heads,
        d_model=heads * head_dim,
        n_layers=1,
        seed=seed % 1000,
    )
    device = kernel_device()
    reference, fast = reference_and_fast(config, device, rotary="triton", compile="never")
    assert describe(fast)["rotary"] == "triton"
    ids = random_ids(seed, config.d_vocab, 2, seq_len).to(device)
    assert_same_function(reference, fast, ids)
    fast.eval(), reference.eval()
    with torch.no_grad():
        want = reference(ids)
        # untraced: q and k rotated in place (rotary_qk); traced path: the module kernels
        torch.testing.assert_close(fast(ids), want, **FP32_LOGITS)
        torch.testing.assert_close(fast.forward_modules(ids), want, **FP32_LOGITS)


@pytest.mark.triton
def test_no_grad_fast_path_rotates_q_and_k_in_place_and_autograd_out_of_place(monkeypatch):
    from wmfast.ops import rotary as ops

    calls = []
    in_place = ops.rotary_qk_packed_
    monkeypatch.setattr(ops, "rotary_qk_packed_", lambda *a: (calls.append(a), in_place(*a))[1])
    config = small_config(positional_embedding_type="rotary_qk")
    reference, fast = reference_and_fast(config, kernel_device(), rotary="triton", compile="never")
    ids = random_ids(5, config.d_vocab, 2, 7).to(kernel_device())
    reference.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), reference(ids), **FP32_LOGITS)
    assert len(calls) == config.n_layers  # one in-place rotation per layer
    calls.clear()
    torch.testing.assert_close(fast(ids), reference(ids), **FP32_LOGITS)
    assert not calls  # with grad: new tensors, autograd through the rotation


@pytest.mark.triton
@pytest.mark.parametrize("packed", [True, False])
def test_triton_rotary_qk_training_writes_the_packed_gradient(monkeypatch, packed):
    """With grad, q and k come from rotary_qkv_packed (its backward writes the
    projection's gradient whole) unless backends.PACKED_ROTARY_QK_GRADIENT is
    off (the benchmark's A/B); both train like the reference, compiled too."""
    from wmfast.ops import rotary as ops

    monkeypatch.setattr(backends, "PACKED_ROTARY_QK_GRADIENT", packed)
    calls = []
    real = ops.rotary_qkv_packed
    monkeypatch.setattr(ops, "rotary_qkv_packed", lambda *a: (calls.append(1), real(*a))[1])
    config = small_config(positional_embedding_type="rotary_qk", d_model=16, n_heads=2)
    device = kernel_device()
    ids = random_ids(8, config.d_vocab, 2, 6).to(device)
    for compile_ in ("never", "always"):
        calls.clear()
        reference, fast = reference_and_fast(config, device, rotary="triton", compile=compile_)
        assert_same_function(reference, fast, ids, train=True)
        if compile_ == "never":  # (compiled code calls what Dynamo traced, not the name)
            assert len(calls) == (config.n_layers if packed else 0)


# -- the kernel path: the Triton add & norm inside the model ---------------------------


@pytest.mark.triton_loops
@pytest.mark.triton
@given(
    st.sampled_from(POSITIONAL_TYPES),
    st.sampled_from([0, 7]),  # d_mlp 0: the bias-only block, a row-broadcast y
    st.sampled_from([1, 5]),
    st.integers(0, 2**31 - 1),
)
def test_fast_with_triton_norm_equals_reference(pe, d_mlp, seq_len, seed):
    config = small_config(
        positional_embedding_type=pe, d_model=16, n_heads=2, d_mlp=d_mlp, seed=seed % 1000
    )
    device = kernel_device()
    reference, fast = reference_and_fast(config, device, norm="triton", compile="never")
    assert describe(fast)["norm"] == "triton"
    ids = random_ids(seed, config.d_vocab, 2, seq_len).to(device)
    assert_same_function(reference, fast, ids, train=True)
    assert fast._fast.last_plan.norm == "triton"
    fast.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), reference(ids), **FP32_LOGITS)


@pytest.mark.triton_loops
@pytest.mark.triton
@given(seed=st.integers(0, 2**31 - 1))
def test_compiled_fast_with_triton_norm_equals_reference(seed):
    """One fixed config (the SIR model's d_mlp 0), compiled: drawn token ids."""
    device = kernel_device()
    reference, fast = _triton_norm_compiled_pair(device)
    ids = random_ids(seed, TRITON_NORM_CONFIG.d_vocab, 2, 5).to(device)
    assert_same_function(reference, fast, ids, train=True)
    assert fast._fast.last_plan == wf.Plan(
        compiled=True, rotary=describe(fast)["rotary"], attention="sdpa", norm="triton"
    )


@pytest.mark.triton_loops
@pytest.mark.triton
@pytest.mark.parametrize(
    "d_mlp, fused, ops",
    [
        (0, True, {"bias_ffn_norms"}),
        (0, False, {"dropout_add_layer_norm"}),
        (7, True, {"dropout_add_layer_norm"}),
    ],
)
def test_triton_norm_takes_both_norms_of_a_d_mlp_0_layer_in_one_op(monkeypatch, d_mlp, fused, ops):
    """At d_mlp 0 the layer's two add & norms run as one op (the feed-forward
    block is its bias: wmfast.ops.bias_ffn_norms), forward and backward,
    unless backends.FUSED_NORMS_AT_D_MLP_0 is off (the benchmark's A/B)."""
    monkeypatch.setattr(backends, "FUSED_NORMS_AT_D_MLP_0", fused)
    config = small_config(positional_embedding_type="standard", d_model=16, n_heads=2, d_mlp=d_mlp)
    _, fast = reference_and_fast(config, kernel_device(), norm="triton", compile="never")
    ids = random_ids(5, config.d_vocab, 2, 6).to(kernel_device())
    with RecordOps() as seen:
        fast(ids).sum().backward()
    names = {n.removesuffix(".default").removesuffix("_traceable") for n in seen.names}
    norm_ops = {n.split(".")[1] for n in names if n.startswith("wmfast.")} - {"embedding_rotation"}
    assert norm_ops == ops | {f"{op}_backward" for op in ops}


TRITON_NORM_CONFIG = small_config(
    positional_embedding_type="rotary_qk", d_model=16, n_heads=2, d_mlp=0
)


@functools.cache
def _triton_norm_compiled_pair(device):
    """One compile for the whole module (hypothesis calls the test per draw)."""
    return reference_and_fast(TRITON_NORM_CONFIG, device, norm="triton", compile="always")


@pytest.mark.triton_loops
@pytest.mark.triton
@pytest.mark.parametrize("pe, d_mlp", [("rotary_qk", 48), ("standard", 48), ("None", 0)])
def test_triton_norm_under_bf16_autocast_trains_like_the_reference(pe, d_mlp):
    """Under autocast the kernel also writes the bf16 copy the next products take.
    Logits and gradients stay as close to the reference's as bf16 allows: on
    CUDA within 2% (relative norm); under the interpreter, which truncates
    where the GPU rounds to nearest, every rounding errs the same way, and this
    tiny model's gradients move up to ~6% (the same as the torch path's with
    its casts truncated: checked by hand), so 10% there."""
    from wmfast.kernels._triton import INTERPRETED

    device = kernel_device()
    pe = None if pe == "None" else pe
    config = small_config(positional_embedding_type=pe, d_model=16, n_heads=2, d_mlp=d_mlp)
    reference, fast = reference_and_fast(config, device, norm="triton", compile="never")
    ids = random_ids(4, config.d_vocab, 2, 6).to(device)
    weight = torch.randn(2, 6, config.d_vocab, generator=torch.Generator().manual_seed(1))
    results = []
    for model in (reference, fast):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(ids)
        loss = (logits.float() * weight.to(device)).sum()
        results.append((logits, *torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(results[1][0].float(), results[0][0].float(), **AUTOCAST_LOGITS)
    bound = 0.1 if INTERPRETED else 0.02
    names = [n for n, _ in reference.named_parameters()]
    for name, got, want in zip(names, results[1][1:], results[0][1:], strict=True):
        assert got.dtype == want.dtype, name
        assert (got - want).norm() <= bound * want.norm(), name


# -- the compiled path: fixed configs, drawn inputs ----------------------------------

COMPILED_CONFIGS = {
    f"transformer-{pe}": small_config(positional_embedding_type=pe) for pe in POSITIONAL_TYPES
}
COMPILED_CONFIGS["rnn"] = small_config(model_class="rnn", act_fn="tanh")
COMPILED_CONFIGS["lstm"] = small_config(model_class="lstm")


@pytest.fixture(scope="module")
def compiled_pairs():
    """One reference/fast pair per (device, config) for the whole module: one compile each."""
    pairs = {}

    def get(device, name):
        if (device, name) not in pairs:
            pairs[device, name] = reference_and_fast(COMPILED_CONFIGS[name], device)
        return pairs[device, name]

    return get


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(COMPILED_CONFIGS))
@given(seed=st.integers(0, 2**31 - 1))
def test_compiled_fast_equals_reference_no_grad(compiled_pairs, device, name, seed):
    reference, fast = compiled_pairs(device, name)
    reference.eval(), fast.eval()
    ids = random_ids(seed, 50, 2, 9).to(device)  # one shape: one graph per config
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), reference(ids), **FP32_LOGITS)
    if name.startswith("transformer"):
        assert describe(fast)["compiled_no_grad"] is True


def test_the_plan_is_worked_out_once_per_call_context(compiled_pairs, monkeypatch):
    """FastRunner._setup keeps a transformer call's plan per context: a call
    in another context (the grad mode here; torch.func in the vmap test) gets
    its own, and a context seen before asks the rules nothing."""
    reference, fast = compiled_pairs("cpu", "transformer-rotary_qk")
    reference.eval(), fast.eval()
    fast._fast._setups.clear()
    asked = []
    real_plan = wf.FastRunner.plan
    monkeypatch.setattr(
        wf.FastRunner,
        "plan",
        lambda self, *a, **k: asked.append(torch.is_grad_enabled()) or real_plan(self, *a, **k),
    )
    ids = random_ids(29, 50, 2, 9)
    for grad in (False, True, False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(fast(ids), reference(ids), **FP32_LOGITS)
        assert fast._fast.last_plan.compiled is (not grad)  # the CPU rule
    assert asked == [False, True]


@pytest.mark.parametrize("device", DEVICES)
def test_compile_always_trains_like_the_reference(device):
    # the CPU rule does not compile the training step; "always" does (CUDA's rule
    # too): the same function
    config = small_config(positional_embedding_type="rotary_qk", dropout=0.0)
    reference, fast = reference_and_fast(config, device, compile="always")
    assert_same_function(reference, fast, random_ids(3, 50, 2, 9), train=True)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "pe, options",
    [(pe, {}) for pe in POSITIONAL_TYPES]
    + [("rotary", dict(rotary="triton")), ("rotary", dict(rotary="triton", compile="never"))],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(map(str, v.values())) or "auto",
)
def test_cuda_training_step_equals_reference_at_the_check_size(pe, options):
    # wmfast check's own models and input size, on CUDA's rules (compiled training,
    # Triton rotary and add & norm), and the Triton embedding rotation with grads
    # compiled and not, where `wmfast check --device cuda` once reported wrong
    # gradients (a ReLU kink: see backends.COMPILED_TRAINING_EMBEDDING_ROTATION;
    # these ids keep every ReLU input in layer 0 >= 1.4e-5 from zero).
    # Gradients are judged against fp64, not against the fp32 reference: at this
    # size, with the loss summed over 8x128x64 logits, the fp32 reference's own
    # gradients are 3.8-6.6e-5 from fp64 on the H100, and fast's other order of
    # sums (Triton add & norm, Inductor) put 1 element in 4096 1.0-1.6e-5 from
    # the reference's, past SPEC's atol of 1e-5. Fast is at most 1.65x as far
    # from fp64 as the reference (bench/results/h100-3-fp64.txt).
    from wmfast.check import DEFAULT_BATCH, DEFAULT_SEQ_LEN, default_configs

    config = default_configs()[f"transformer/{pe}"]
    reference, fast = reference_and_fast(config, "cuda", **options)
    ids = random_ids(11, config.d_vocab, DEFAULT_BATCH, DEFAULT_SEQ_LEN).cuda()
    reference.train()
    fast.train()
    torch.testing.assert_close(fast(ids), reference(ids), **FP32_LOGITS)
    assert_as_close_to_fp64_as_the_reference(reference, fast, ids)
    assert describe(fast)["compiled_with_grad"] is (options.get("compile") != "never")


@pytest.mark.triton
def test_the_rotary_models_compiled_cuda_training_takes_the_torch_rotation():
    # backends.COMPILED_TRAINING_EMBEDDING_ROTATION: measured faster there
    runner, cuda = wf.FastRunner(), torch.device("cuda")
    rotary = build_model(small_config(positional_embedding_type="rotary"))
    rotary_qk = build_model(small_config(positional_embedding_type="rotary_qk"))
    assert runner.plan(rotary, cuda, grad_enabled=True).rotary == "torch"
    assert runner.plan(rotary, cuda, grad_enabled=False).rotary == "triton"
    assert runner.plan(rotary_qk, cuda, grad_enabled=True).rotary == "triton"
    uncompiled = wf.FastRunner(FastOptions(compile="never"))
    assert uncompiled.plan(rotary, cuda, grad_enabled=True).rotary == "triton"
    explicit = wf.FastRunner(FastOptions(rotary="triton"))  # a choice, not a fix: kept
    assert explicit.plan(rotary, cuda, grad_enabled=True).rotary == "triton"


@pytest.mark.triton
def test_the_triton_norm_serves_compiled_cuda_training_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    model, runner = build_model(small_config()), wf.FastRunner()
    assert runner.plan(model, cuda, grad_enabled=True).norm == "triton"
    assert runner.plan(model, cuda, grad_enabled=False).norm == "torch"
    assert runner.plan(model, cpu, grad_enabled=True).norm == "torch"
    uncompiled = wf.FastRunner(FastOptions(compile="never"))
    assert uncompiled.plan(model, cuda, grad_enabled=True).norm == "torch"
    forced = wf.FastRunner(FastOptions(norm="triton", compile="never"))
    assert forced.plan(model, cpu, grad_enabled=False).norm == "triton"


@pytest.mark.triton
def test_auto_picks_kernels_only_for_the_dtypes_they_take():
    from wmfast.kernels._triton import STORAGE_DTYPES

    assert set(backends.KERNEL_DTYPES) == set(STORAGE_DTYPES)
    cuda, runner = torch.device("cuda"), wf.FastRunner()
    # an fp64 model (a ground truth for error budgets) runs the torch math on
    # CUDA instead of failing in a kernel's dtype check
    for positional in ("rotary", "rotary_qk"):
        model = build_model(small_config(positional_embedding_type=positional)).double()
        for grad in (True, False):
            plan = runner.plan(model, cuda, grad_enabled=grad)
            assert (plan.rotary, plan.norm) == ("torch", "torch"), (positional, grad)
        model.to(torch.bfloat16)
        assert runner.plan(model, cuda, grad_enabled=True).norm == "triton"
    # the traced path asks per tensor: rotary_qk's q is autocast's dtype there
    assert backends.resolve_rotary("auto", cuda, torch.float64) == "torch"
    assert backends.resolve_rotary("auto", cuda, torch.bfloat16) == "triton"
    with pytest.raises(TypeError, match="rotary='triton'"):  # a choice: kept, so refused here
        backends.resolve_rotary("triton", cuda, torch.float64)


@pytest.mark.parametrize("positional", POSITIONAL_TYPES)
@pytest.mark.parametrize("seq_len", [24, 300])  # 300: the CPU paths taken from 256 tokens a call
@pytest.mark.parametrize(
    "train, grad", [(False, False), (False, True), (True, True)], ids=["no_grad", "eval", "train"]
)
def test_uncompiled_fast_in_fp64_equals_the_fp64_reference_to_rounding(
    positional, seq_len, train, grad
):
    # An fp64 model is a user's ground truth (error budgets, gradcheck): no
    # step of the uncompiled fast path may round through fp32. fp32 rounding
    # anywhere shows as >= 1e-8 here; fp64 reordering stays near 1e-15.
    config = small_config(positional_embedding_type=positional, n_ctx=512)
    reference, fast = reference_and_fast(config, compile="never")
    reference.double().train(train)  # (fast shares the parameters, not the mode)
    fast.train(train)
    ids = random_ids(seq_len, config.d_vocab, 2, seq_len)
    with torch.set_grad_enabled(grad):
        want, got = reference(ids), fast(ids)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if grad:
        _assert_fp64_grads_close(reference, fast, want, got)


@pytest.mark.parametrize("positional", ["rotary", "rotary_qk"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "train"])
def test_compiled_fast_in_fp64_equals_the_fp64_reference_to_rounding(positional, grad):
    # A compiled call takes the rotary (cos, sin) tables from
    # FastRunner._rope_tables, computed uncompiled as the reference computes
    # them. With Inductor's own vectorised cos and sin (an fp32 ulp from
    # ATen's at some angles) this forward was 5e-8 to 1.2e-7 from the fp64
    # reference; "standard" and None never compute a table. The training
    # call compiles as CUDA's rule compiles it ("always"; the CPU's does not).
    config = small_config(positional_embedding_type=positional, n_ctx=512, dropout=0.0)
    reference, fast = reference_and_fast(config, compile="always" if grad else "auto")
    reference.double().train(grad)
    fast.train(grad)
    ids = random_ids(7, config.d_vocab, 2, 40)
    with torch.set_grad_enabled(grad):
        want, got = reference(ids), fast(ids)
    assert fast._fast.last_plan.compiled
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if grad:
        _assert_fp64_grads_close(reference, fast, want, got)


def test_compiled_calls_take_the_rotary_tables_of_the_buffer_as_it_is_now():
    # _rope_tables keeps compiled calls' tables per length for the next
    # calls. They must follow the inv_freq buffer (load_state_dict writes it in
    # place), and tables made under inference_mode (inference tensors, which
    # autograd cannot save for a backward) must not serve a training call.
    config = small_config(positional_embedding_type="rotary_qk", dropout=0.0)
    reference, fast = reference_and_fast(config, compile="always")
    ids = random_ids(5, 50, 2, 9)
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids), reference(ids), **FP32_LOGITS)
    assert_same_function(reference, fast, ids, train=True)
    state = reference.state_dict()
    state["pos_encoder.inv_freq"] = state["pos_encoder.inv_freq"] * 1.5
    reference.load_state_dict(state)
    assert fast.pos_encoder.inv_freq is reference.pos_encoder.inv_freq  # shared, as parameters
    assert_same_function(reference, fast, ids, train=True)
    assert fast._fast.last_plan.compiled


def test_the_runner_keeps_rotary_tables_per_length_up_to_a_bound():
    runner = wf.FastRunner()
    inv_freq = WF.rotary_inv_freq(8)
    first = runner._rope_tables(inv_freq, 5)
    assert runner._rope_tables(inv_freq, 7) is not first
    assert runner._rope_tables(inv_freq, 5) is first  # kept while another length ran
    for seq_len in range(10, 10 + wf.ROPE_TABLES_KEPT - 1):
        runner._rope_tables(inv_freq, seq_len)
    assert len(runner._rope_cache) == wf.ROPE_TABLES_KEPT
    assert runner._rope_tables(inv_freq, 5) is not first  # the oldest length went first
    with torch.no_grad():
        inv_freq.mul_(2)  # new values in the same tensor
    kept, fresh = runner._rope_tables(inv_freq, 5), WF.rotary_tables(5, inv_freq)
    for got, want in zip(kept, fresh, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "model_class, act_fn", [("rnn", "relu"), ("rnn", "tanh"), ("lstm", "relu")]
)
def test_recurrent_fast_training_in_fp64_equals_the_fp64_reference_to_rounding(model_class, act_fn):
    # big enough for the CPU training call's own path: the RNN's written-out
    # backward through time, both models' output layer on the rows read
    config = small_config(model_class=model_class, act_fn=act_fn, d_hidden=256, d_vocab=350)
    reference, fast = reference_and_fast(config)
    reference.double().train()
    fast.train()
    ids = random_ids(5, config.d_vocab, 4, 200)
    want, got = reference(ids), fast(ids)
    plan = fast._fast.last_plan
    assert plan.output_layer == "answer rows" and plan.recurrence in ("bptt", "module")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    _assert_fp64_grads_close(reference, fast, want, got)


def _assert_fp64_grads_close(reference, fast, want, got):
    """Parameter gradients of a random loss on the rows workingmem's loss
    reads, fast vs reference, to fp64 rounding (atol scaled by the largest
    entry: each gradient sums hundreds of rows)."""
    weight = torch.randn(
        want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    rows_read = torch.zeros(want.shape[1], dtype=torch.bool)
    rows_read[answer_rows(want.shape[1])] = True
    weight[:, ~rows_read] = 0
    for name, g_ref, g_fast in zip(
        [n for n, _ in reference.named_parameters()],
        _grads(reference, want, weight),
        _grads(fast, got, weight),
        strict=True,
    ):
        scale = max(1.0, g_ref.abs().max().item())
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-12, atol=1e-12 * scale, msg=name)


def test_dynamic_option_serves_every_length_and_batch_size_with_one_graph():
    config = small_config(positional_embedding_type="rotary")
    reference, fast = reference_and_fast(config, dynamic=True)
    reference.eval(), fast.eval()
    with torch.no_grad():
        # first at the length that equals inv_freq's size: a graph dynamic in
        # every dimension would tie the two (duck sizing) and recompile next
        fast(random_ids(0, 50, 2, config.d_model // 2))
        graphs = counters["stats"]["unique_graphs"]
        for batch, seq_len in ((2, 7), (3, 12), (5, 19)):
            ids = random_ids(seq_len, 50, batch, seq_len)
            torch.testing.assert_close(fast(ids), reference(ids), **FP32_LOGITS)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not hasattr(ids, "_dynamo_weak_dynamic_indices")  # the caller's tensor stays unmarked


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_option_keeps_one_graph_across_the_eager_functions_thresholds(device, monkeypatch):
    # The eager ops (rotary_eager, tail_eager) run from a token count up and
    # are traced by the compiled forward too, where they take the plain math:
    # a size comparison reached there became a guard on batch * seq_len, and
    # a dynamic graph recompiled where it flipped (at 256 and 1024 tokens; on
    # CUDA too, where the tail's size test came before its device test).
    # Thresholds low enough for small shapes to cross (conftest sets them to 0).
    monkeypatch.setattr(rotary_eager, "MIN_FUSED_TOKENS", 16)
    monkeypatch.setattr(tail_eager, "MIN_TOKENS", 32)
    config = small_config(positional_embedding_type="rotary_qk", n_layers=1)
    reference, fast = reference_and_fast(config, device, compile="always", dynamic=True)
    shapes = ((2, 5), (3, 9), (4, 11))  # 10, 27 and 44 tokens
    assert describe(fast)["compiled_with_grad"] and describe(fast)["compiled_no_grad"]
    for grad in (True, False):
        graphs_after_each_shape = []
        for batch, seq_len in shapes:
            ids = random_ids(batch * seq_len, 50, batch, seq_len).to(device)
            with torch.set_grad_enabled(grad):
                torch.testing.assert_close(fast(ids), reference(ids), **FP32_LOGITS)
            graphs_after_each_shape.append(counters["stats"]["unique_graphs"])
        assert len(set(graphs_after_each_shape)) == 1, f"grad={grad}: {graphs_after_each_shape}"


def test_each_configuration_compiles_with_its_own_recompile_limit():
    # Dynamo runs a function uncompiled once recompile_limit graphs sit on its
    # code object; with one function for every configuration, a process that
    # built 9 configurations (wmfast check's 4 transformers in 3 modes) ran the
    # 9th uncompiled. With the limit at 1, a second configuration shows it.
    configs = [
        small_config(d_model=8, n_heads=2, n_layers=1, d_mlp=0, d_vocab=13, seed=seed, **change)
        for seed, change in ((0, {}), (1, dict(act_fn="gelu")), (2, {}))
    ]
    ids = random_ids(4, 13, 2, 5)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        graphs = []
        for config in configs:
            reference, fast = reference_and_fast(config)
            reference.eval(), fast.eval()
            with torch.no_grad():
                torch.testing.assert_close(fast(ids), reference(ids), **FP32_LOGITS)
            assert describe(fast)["compiled_no_grad"] is True
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] > graphs[0]  # the gelu configuration compiled a graph of its own
    assert graphs[2] == graphs[1]  # a seed sweep (same configuration) reuses the graph


@pytest.mark.parametrize("variant", ["fast", "reference"])
def test_a_model_compiled_by_the_user_takes_fullgraph_and_keeps_its_id_check(variant):
    # torch.compile(fast_model) traces the root forward and the runner, which
    # hands it the plain forward; the input check keeps its range check in the
    # graph as an assert: nothing on that way may break the graph (workingmem's
    # models compile with fullgraph=True)
    reference, fast = reference_and_fast(
        small_config(positional_embedding_type="rotary_qk"), dynamic=True
    )
    reference.eval(), fast.eval()
    model = fast if variant == "fast" else copy.deepcopy(reference)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for seq_len in (5, 9):
            ids = random_ids(seq_len, 50, 2, seq_len)
            torch.testing.assert_close(compiled(ids), reference(ids), **FP32_LOGITS)
        ids[1, 3] = 50
        with pytest.raises(RuntimeError, match=r"a token id is out of range \[0, d_vocab=50\)"):
            compiled(ids)


# -- same module tree, shared parameters, checkpoints -----------------------------------


@pytest.mark.parametrize("name", list(COMPILED_CONFIGS))
def test_same_module_paths_and_state_dict_keys(name):
    reference, fast = reference_and_fast(COMPILED_CONFIGS[name])
    assert [n for n, _ in fast.named_modules()] == [n for n, _ in reference.named_modules()]
    assert [type(m) for _, m in fast.named_modules()] == [
        type(m) for _, m in reference.named_modules()
    ]
    assert list(fast.state_dict()) == list(reference.state_dict())


def test_make_fast_shares_parameters_and_buffers():
    reference, fast = reference_and_fast(small_config(positional_embedding_type="rotary"))
    for (name, p), q in zip(reference.named_parameters(), fast.parameters(), strict=True):
        assert p is q, name
    assert fast.pos_encoder.inv_freq is reference.pos_encoder.inv_freq
    assert reference.variant == "reference" and fast.variant == "fast"
    with torch.no_grad():
        fast.output_layer.bias.add_(1.0)  # a step on one is a step on the other
    assert torch.equal(reference.output_layer.bias, fast.output_layer.bias)
    back = make_reference(fast)
    assert back.variant == "reference" and back.embedding.weight is fast.embedding.weight


class _Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_the_fast_path_reads_the_weights_a_model_has_at_each_call():
    # wmfast gathers the weights from the modules' dicts on every call: a new
    # Parameter, a load_state_dict and a parametrization (a property, not a
    # registered parameter) must all reach the fast path
    torch.manual_seed(0)
    reference, fast = reference_and_fast(small_config(positional_embedding_type="standard"))
    ids = random_ids(6, 50, 2, 7)
    seen = [fast(ids)]

    new_bias = torch.nn.Parameter(torch.randn(reference.d_model))
    for model in (reference, fast):
        model.transformer_encoder.layers[1].linear2.bias = new_bias
    seen.append(fast(ids))
    torch.testing.assert_close(seen[-1], reference(ids), **FP32_LOGITS)

    other = build_model(small_config(positional_embedding_type="standard", seed=1))
    reference.load_state_dict(other.state_dict())  # into the tensors fast shares
    seen.append(fast(ids))
    torch.testing.assert_close(seen[-1], reference(ids), **FP32_LOGITS)

    for model in (reference, fast):
        torch.nn.utils.parametrize.register_parametrization(
            model.transformer_encoder.layers[0].linear1, "weight", _Doubled()
        )
    assert fast_path_mismatch(fast) is None  # a parametrization changes reads, not the math
    seen.append(fast(ids))
    torch.testing.assert_close(seen[-1], reference(ids), **FP32_LOGITS)
    for earlier, later in itertools.pairwise(seen):
        assert (later - earlier).abs().max() > 1e-3  # each change changed the logits


def test_make_fast_refuses_a_model_it_cannot_speed_up():
    with pytest.raises(TypeError, match="wmfast.load_model"):
        make_fast(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("direction", ["fast_to_reference", "reference_to_fast"])
def test_checkpoints_load_strictly_both_ways(tmp_path, direction):
    from wmfast import load_model, save_run

    config = small_config(positional_embedding_type="rotary_qk")
    source_variant, target_variant = direction.split("_to_")
    source = build_model(config, variant=source_variant)
    save_run(tmp_path, source, config)
    target = load_model(tmp_path, variant=target_variant)
    assert target.variant == target_variant
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


# -- casts, autocast, copies ----------------------------------------------------------


@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_fast_after_cast_to_bf16_keeps_fp32_angles(pe):
    reference, fast = reference_and_fast(small_config(positional_embedding_type=pe))
    fast.to(torch.bfloat16)  # shared tensors: the reference is cast too
    if pe in ("rotary", "rotary_qk"):
        assert fast.pos_encoder.inv_freq.dtype == torch.float32
    ids = random_ids(4, 50, 2, 7)
    out = fast(ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(ids).float(), **AUTOCAST_LOGITS)


@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_built_on_the_meta_device_then_loaded_equals_the_reference(pe):
    # the large-model idiom: build without memory, to_empty, load a checkpoint
    config = small_config(positional_embedding_type=pe)
    reference = reference_model(config)
    with torch.device("meta"):
        fast = build_model(config).to(torch.bfloat16).float()
    fast.to_empty(device="cpu").load_state_dict(reference.state_dict())
    if pe in ("rotary", "rotary_qk"):
        assert fast.pos_encoder.inv_freq.dtype == torch.float32
    ids = random_ids(6, 50, 2, 7)
    torch.testing.assert_close(fast(ids), reference(ids), **FP32_LOGITS)


@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_fast_under_bf16_autocast_is_close_to_fp32_reference(pe):
    reference, fast = reference_and_fast(small_config(positional_embedding_type=pe))
    ids = random_ids(5, 50, 2, 7)
    want = reference(ids).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast(ids)
    torch.testing.assert_close(got.float(), want, **AUTOCAST_LOGITS)
    got.float().sum().backward()  # and it trains under autocast
    assert fast.embedding.weight.grad is not None


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_per_sample_gradients_through_torch_func_equal_the_reference(pe):
    # vmap(grad(...)) over functional_call: wmfast's autograd Functions have no
    # functorch rules, so under a transform the fast model runs the plain math
    reference, fast = reference_and_fast(small_config(positional_embedding_type=pe))
    params = {name: p.detach() for name, p in reference.named_parameters()}
    ids = random_ids(17, 50, 3, 9)
    per_sample = []
    for model in (reference, fast):
        model.check_token_ids = False  # a host sync: no value to read under vmap

        def loss(p, one_ids, model=model):
            logits = torch.func.functional_call(model, p, (one_ids.unsqueeze(0),))
            return (logits * logits.detach().sign()).mean()

        per_sample.append(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, ids))
    assert fast._fast.last_plan.compiled is False
    for name in params:
        want = per_sample[0][name]
        torch.testing.assert_close(per_sample[1][name], want, **FP32_GRADS, msg=name)
        assert want.shape[0] == 3 and want.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_vmap_runs_the_plain_math_where_the_rules_would_compile():
    # no-grad on CPU compiles by the rules; under vmap the runner must leave
    # compile and its custom ops (Triton ones on CUDA) aside
    reference, fast = reference_and_fast(small_config(positional_embedding_type="rotary_qk"))
    reference.eval(), fast.eval()
    ids = random_ids(19, 50, 3, 9)
    with torch.no_grad():  # the plan kept for this context (FastRunner._setup) compiles
        fast(ids[:2])  # (COMPILED_CONFIGS' shape: no compile of its own)
    assert fast._fast.last_plan.compiled is True
    outs = []
    for model in (reference, fast):
        model.check_token_ids = False
        with torch.no_grad():
            outs.append(torch.func.vmap(lambda one, m=model: m(one.unsqueeze(0))[0])(ids))
    assert fast._fast.last_plan.compiled is False
    torch.testing.assert_close(outs[1], outs[0], **FP32_LOGITS)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_a_vmapped_ensemble_of_seeds_equals_the_reference(pe):
    """torch.func's model ensembling (stack_module_state, vmap over the
    stacked parameters): several seeds of a sweep in one call, forward and
    the gradients of every member's loss (RNN/LSTM: PyTorch has no batching
    rule for its recurrences, on the reference either)."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    ids = random_ids(29, 50, 2, 7)
    results = []
    for variant in ("reference", "fast"):
        members = [
            build_model(small_config(positional_embedding_type=pe, seed=s), variant=variant)
            for s in (1, 2, 3)
        ]
        params, buffers = stack_module_state(members)
        base = copy.deepcopy(members[0]).to("meta")

        def member_logits(p, b, base=base):
            return functional_call(base, (p, b), (ids,))

        def loss(p, b):
            logits = member_logits(p, b)
            return (logits * logits.detach().sign()).mean()

        results.append((vmap(member_logits)(params, buffers), vmap(grad(loss))(params, buffers)))
    (want, want_grads), (got, got_grads) = results
    assert want.shape[0] == 3 and (want[0] - want[1]).abs().max() > 1e-3  # three seeds
    torch.testing.assert_close(got, want, **FP32_LOGITS)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **FP32_GRADS, msg=name)


@pytest.mark.parametrize(
    "config",
    [small_config(positional_embedding_type=pe) for pe in POSITIONAL_TYPES]
    + [small_config(model_class="rnn", act_fn="tanh")],
    ids=[*map(str, POSITIONAL_TYPES), "rnn"],
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_forward_mode_ad_equals_the_reference(config, train):
    # dual tensors (torch.autograd.forward_ad): wmfast's autograd Functions
    # define no jvp, so the fast model runs the plain math, uncompiled (the CPU
    # training path's Functions would run here). Where the reference itself
    # has no forward AD, neither is compared: SDPA's fused CPU kernel (so the
    # math backend here), the encoder's fused path (no_grad or no parameter
    # requiring grad, in eval), oneDNN's LSTM.
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel

    reference, fast = reference_and_fast(config)
    ids = random_ids(23, 50, 2, 9)
    gen = torch.Generator().manual_seed(24)
    tangents = {n: torch.randn(p.shape, generator=gen) for n, p in reference.named_parameters()}
    jvps = []
    for model in (reference, fast):
        model.train(train)
        with fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH):
            # primals that require grad: the encoder's fused path stays off in eval
            params = {
                n: fwAD.make_dual(p.detach().requires_grad_(), tangents[n])
                for n, p in model.named_parameters()
            }
            logits = torch.func.functional_call(model, params, (ids,))
            jvps.append(fwAD.unpack_dual(logits).tangent)
    assert fast._fast.last_plan.compiled is False
    assert jvps[0].abs().max() > 0
    torch.testing.assert_close(jvps[1], jvps[0], **FP32_GRADS)


@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_trains_after_a_first_call_under_inference_mode(pe):
    # nothing made during an inference_mode call may be kept and later saved
    # for backward (inference tensors cannot be)
    reference, fast = reference_and_fast(
        small_config(positional_embedding_type=pe), compile="never"
    )
    ids = random_ids(23, 50, 2, 9)
    with torch.inference_mode():
        fast(ids)
    assert_same_function(reference, fast, ids, train=True)


@pytest.mark.parametrize("clone", ["deepcopy", "pickle"])
def test_fast_survives_deepcopy_and_pickle(clone, caplog, monkeypatch):
    reference, fast = reference_and_fast(small_config(positional_embedding_type="rotary_qk"))
    copied = copy.deepcopy(fast) if clone == "deepcopy" else pickle.loads(pickle.dumps(fast))
    assert copied.variant == "fast" and copied._fast.options == fast._fast.options
    assert copied.embedding.weight is not fast.embedding.weight  # a real copy
    ids = random_ids(6, 50, 2, 9)
    reference.eval(), copied.eval()
    # as in a new process, where an unpickled model compiles: it says so
    monkeypatch.setattr(wf, "_ANNOUNCED_COMPILES", set())
    with caplog.at_level(logging.WARNING, logger="wmfast"), torch.no_grad():
        torch.testing.assert_close(copied(ids), reference(ids), **FP32_LOGITS)
    assert caplog.text.count("torch.compile may take") == 1


def test_a_compile_is_announced_once_per_configuration_not_per_model(caplog, monkeypatch):
    """A seed sweep in one process: the second model of a configuration reuses
    the first one's graphs (wmfast.fast._compiled_forward), so only the first
    says that it compiles; another grad mode or configuration says it again."""
    monkeypatch.setattr(wf, "_ANNOUNCED_COMPILES", set())
    ids = random_ids(8, 50, 2, 9)
    with caplog.at_level(logging.WARNING, logger="wmfast"), torch.no_grad():
        for seed in (0, 1, 2):
            build_model(small_config(positional_embedding_type="rotary_qk", seed=seed)).eval()(ids)
        assert caplog.text.count("torch.compile may take") == 1
        build_model(small_config(positional_embedding_type="rotary_qk")).train()(ids)
        assert caplog.text.count("torch.compile may take") == 2


def _own_path_runs(monkeypatch) -> list:
    """A list that gets an entry each time a fast transformer runs its own
    (uncompiled) path, as CPU calls with grad do."""
    runs = []
    real_forward = wf.transformer_forward
    monkeypatch.setattr(
        wf, "transformer_forward", lambda *a, **k: runs.append(1) or real_forward(*a, **k)
    )
    return runs


def test_forward_hooks_make_the_fast_model_take_its_module_path(monkeypatch):
    reference, fast = reference_and_fast(small_config(positional_embedding_type="rotary_qk"))
    runs = _own_path_runs(monkeypatch)
    seen = []
    rotary = fast.transformer_encoder.layers[1].self_attn.rotary
    handle = rotary.register_forward_hook(lambda m, a, out: seen.append(out[0].shape))
    ids = random_ids(0, 50, 2, 5)
    torch.testing.assert_close(fast(ids), reference(ids), **FP32_LOGITS)
    assert seen == [(2, 5, 4, 8)] and runs == []  # the hook fired: the module path ran
    handle.remove()
    fast(ids)
    assert runs == [1]  # without hooks: the fast path again


def _register_backward_hook(model, kind: str, record):
    layer = model.transformer_encoder.layers[0]
    if kind == "full_backward":
        return layer.register_full_backward_hook(lambda m, gi, go: record(go[0]))
    if kind == "full_backward_pre":
        return layer.linear1.register_full_backward_pre_hook(lambda m, go: record(go[0]))
    return torch.nn.modules.module.register_module_full_backward_hook(  # every module
        lambda m, gi, go: record(go[0])
    )


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the global one, at the ids
@pytest.mark.parametrize("kind", ["full_backward", "full_backward_pre", "global"])
def test_backward_hooks_fire_on_the_fast_model_as_on_the_reference(monkeypatch, kind):
    """A full backward hook is attached when its module is called: on the fast
    path no submodule is called, so a fast model with one takes its module
    path, and the hook sees the gradients the reference's sees."""
    reference, fast = reference_and_fast(small_config(positional_embedding_type="rotary_qk"))
    runs = _own_path_runs(monkeypatch)
    ids = random_ids(3, 50, 2, 5)
    seen = {}
    for name, model in (("reference", reference), ("fast", fast)):
        seen[name] = []
        handle = _register_backward_hook(model, kind, seen[name].append)
        try:
            model(ids).pow(2).sum().backward()
        finally:
            handle.remove()
    assert len(seen["fast"]) == len(seen["reference"]) > 0 and runs == []
    for got, want in zip(seen["fast"], seen["reference"], strict=True):
        torch.testing.assert_close(got, want, **FP32_GRADS)
    fast(ids)
    assert runs == [1]  # hooks removed: the fast path again


class _TimesTwo(torch.nn.Module):
    """A wrapper a user might put around a submodule (a LoRA, an intervention)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        out = self.inner(*args)
        return tuple(2 * t for t in out) if isinstance(out, tuple) else 2 * out


def _edit(model, edit: str) -> None:
    """One change of the module tree after building, as a user might make it."""
    layer = model.transformer_encoder.layers[1]
    if edit == "activation":
        layer.activation = torch.nn.GELU()
    elif edit == "wrapped_linear1":
        layer.linear1 = _TimesTwo(layer.linear1)
    elif edit == "one_dropout_p":
        layer.dropout2.p = 0.5
    elif edit == "one_eps":
        layer.norm2.eps = 0.1
    elif edit == "one_dropout_in_eval":
        layer.dropout.eval()
    elif edit == "rotary_removed":
        layer.self_attn.rotary = _TimesTwo(layer.self_attn.rotary)
    elif edit == "final_norm":
        model.transformer_encoder.norm = torch.nn.LayerNorm(model.d_model)
    elif edit == "padding_idx":
        model.embedding.padding_idx = 3  # the gradient of that row is zero
    elif edit == "sparse_embedding":
        model.embedding.sparse = True  # the same values, a sparse gradient
    elif edit == "removed_bias":  # at d_mlp 0 the block is this bias: it crashed
        layer.linear2.bias = None
    elif edit == "norm_without_affine":
        layer.norm1.weight = layer.norm1.bias = None


@pytest.mark.parametrize(
    "edit",
    [
        "activation",
        "wrapped_linear1",
        "one_dropout_p",
        "one_eps",
        "one_dropout_in_eval",
        "rotary_removed",
        "final_norm",
        "padding_idx",
        "sparse_embedding",
        "removed_bias",
        "norm_without_affine",
    ],
)
def test_a_changed_module_tree_runs_the_module_path_with_a_warning(caplog, edit):
    """The module path honours a module tree changed after building; the fast
    path computes the built layers' math with one set of constants, so where
    they differ a fast model runs its module path (and says so once), and
    computes what the reference computes: values and gradients."""
    positional = "rotary_qk" if edit == "rotary_removed" else "standard"
    d_mlp = 0 if edit == "removed_bias" else 48
    config = small_config(positional_embedding_type=positional, dropout=0.1, d_mlp=d_mlp)
    reference, fast = reference_and_fast(config)
    assert fast_path_mismatch(fast) is None
    for model in (reference, fast):
        _edit(model, edit)
    ids = random_ids(4, config.d_vocab, 2, 6)
    outputs, grads = [], []
    with caplog.at_level(logging.WARNING, logger="wmfast"):
        for model in (reference, fast):
            torch.manual_seed(5)  # train mode, dropout 0.1: the same masks on the same path
            out = model(ids)
            outputs.append(out)
            grads.append(torch.autograd.grad(out.pow(2).sum(), list(model.parameters())))
        fast(ids)  # said once
    reason = fast_path_mismatch(fast)
    assert reason is not None and fast._fast.last_plan.attention == "none (module path)"
    assert caplog.text.count(reason) == 1
    assert describe(fast)["module_path_reason"] == reason
    torch.testing.assert_close(outputs[1], outputs[0], **FP32_LOGITS)
    for got, want in zip(grads[1], grads[0], strict=True):
        assert got.layout == want.layout
        torch.testing.assert_close(got, want, **FP32_GRADS)


@pytest.mark.parametrize(
    "model_class, path",
    [
        ("transformer", "transformer_encoder.layers.1.linear1"),
        ("transformer", "transformer_encoder.layers.0.self_attn.rotary"),
        ("rnn", "rnn_core.rnn"),
        ("rnn", "output_layer"),
    ],
)
def test_a_forward_replaced_on_an_instance_runs_the_module_path(
    caplog, monkeypatch, model_class, path
):
    """The fast path calls no submodule, so it would skip a forward set on a
    submodule's instance; the model runs its module path instead, says so
    once, and computes what the reference computes, values and gradients."""
    monkeypatch.setattr(output_layer_eager, "MIN_PRODUCTS", 1)  # its row backward at this size
    fields = dict(positional_embedding_type="rotary_qk") if model_class == "transformer" else {}
    config = small_config(model_class=model_class, **fields)
    reference, fast = reference_and_fast(config)
    ids = random_ids(8, config.d_vocab, 2, 6)
    unpatched = reference(ids).detach()
    for model in (reference, fast):
        module = model.get_submodule(path)
        module.forward = HalvedForward(module)
    outputs, grads = [], []
    with caplog.at_level(logging.WARNING, logger="wmfast"):
        for model in (reference, fast):
            out = model(ids)
            outputs.append(out)
            grads.append(torch.autograd.grad(out.pow(2).sum(), list(model.parameters())))
        fast(ids)  # said once
    reason = f"{path}.forward is set on the instance"
    assert caplog.text.count(reason) == 1 and describe(fast)["module_path_reason"] == reason
    assert (outputs[0] - unpatched).abs().max() > 1e-3  # the replacement matters
    torch.testing.assert_close(outputs[1], outputs[0], **FP32_LOGITS)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, **FP32_GRADS)
    del fast.get_submodule(path).forward
    assert describe(fast)["module_path_reason"] is None
    torch.testing.assert_close(fast(ids), unpatched, **FP32_LOGITS)
    assert fast._fast.last_plan.attention != "none (module path)"


def test_an_unchanged_tree_keeps_the_fast_path_through_copies_and_casts():
    for positional in ("standard", "rotary", "rotary_qk", None):
        _, fast = reference_and_fast(small_config(positional_embedding_type=positional))
        for model in (fast, fast.eval(), copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            assert fast_path_mismatch(model) is None
        assert fast_path_mismatch(fast.to(torch.bfloat16)) is None


@pytest.mark.parametrize("model_class, core", [("rnn", "rnn_core"), ("lstm", "lstm_core")])
def test_recurrent_fast_models_with_hooks_run_their_modules(model_class, core, monkeypatch):
    """Their CPU training calls skip the core (the RNN) and the output layer
    module (wmfast.ops.rnn_eager, output_layer_eager): a hook on a submodule
    sends the call through the modules, where it fires, with the
    reference's output bit for bit."""
    monkeypatch.setattr(output_layer_eager, "MIN_PRODUCTS", 1)  # its row backward at this size
    config = small_config(model_class=model_class, act_fn="tanh")
    reference, fast = reference_and_fast(config)
    seen = []
    handle = getattr(fast, core).register_forward_hook(lambda m, a, out: seen.append(out.shape))
    ids = random_ids(2, config.d_vocab, 2, 5)
    assert torch.equal(fast(ids), reference(ids))
    assert seen == [(2, 5, config.d_hidden)] and fast._fast.last_plan.recurrence == "module"
    handle.remove()
    fast(ids)
    assert fast._fast.last_plan.output_layer == "answer rows"  # the runner ran
    assert fast._fast.last_plan.recurrence == ("bptt" if model_class == "rnn" else "module")


@pytest.mark.parametrize("model_class", ["rnn", "lstm"])
def test_recurrent_calls_that_run_the_modules_skip_the_plan(model_class, monkeypatch):
    """No-grad calls, and an LSTM training call whose output layer is below
    output_layer_eager's size, run the modules before any other question:
    no plan, no hook walk (host time that small calls showed)."""

    def refuse(*args, **kwargs):
        raise AssertionError("asked the plan or the hook walk")

    monkeypatch.setattr(wf.FastRunner, "plan", refuse)
    monkeypatch.setattr(wf, "why_submodules_must_run", refuse)
    config = small_config(model_class=model_class, act_fn="tanh")
    reference, fast = reference_and_fast(config)
    ids = random_ids(4, config.d_vocab, 2, 5)
    with torch.no_grad():
        assert torch.equal(fast(ids), reference(ids))
    assert fast._fast.last_plan == wf._RECURRENT_MODULES
    if model_class == "lstm":  # with grad: the LSTM's own path would be its modules here
        assert not output_layer_eager.large_enough(ids.numel() * config.d_hidden, config.d_vocab)
        fast._fast.last_plan = None
        assert torch.equal(fast(ids), reference(ids))
        assert fast._fast.last_plan == wf._RECURRENT_MODULES


def test_rnn_training_plan_says_when_its_output_layer_is_below_the_row_backwards_size():
    config = small_config(model_class="rnn", act_fn="tanh")
    reference, fast = reference_and_fast(config)
    ids = random_ids(5, config.d_vocab, 2, 5)
    torch.testing.assert_close(fast(ids), reference(ids), **FP32_LOGITS)
    plan = fast._fast.last_plan
    assert (plan.recurrence, plan.output_layer) == ("bptt", "module")


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("grad", [False, True])
def test_recurrent_calls_modules_agrees_with_the_recurrent_rules(device, grad):
    """Where the runner's first question says "modules", the rules it skips
    say "module" too, whatever else holds."""
    ids = torch.zeros(2, 3, dtype=torch.long, device=device)
    with torch.set_grad_enabled(grad):
        calls_modules = backends.recurrent_calls_modules(ids)
    assert calls_modules == (device != "cpu" or not grad)
    if calls_modules:
        for model_class, dtype, records in itertools.product(
            ("rnn", "lstm"), (torch.float32, torch.float64), (False, grad)
        ):
            device_ = torch.device(device)
            assert backends.resolve_recurrence(model_class, device_, dtype, records) == "module"
            assert backends.resolve_output_layer(device_, records) == "module"


# -- frozen parameters ----------------------------------------------------------------

# The autograd Functions of the fast CPU training call, per model class
_CPU_TRAINING_FUNCTIONS = {
    "transformer": [tail_eager._Tail, mlp_eager._ReluMLP, rotary_eager._RotateInterleavedQK],
    "rnn": [rnn_eager._ElmanRNN, output_layer_eager._OutputLayer],
    "lstm": [output_layer_eager._OutputLayer],
}


@pytest.mark.parametrize("frozen", ["embeddings", "first_layer"])
@pytest.mark.parametrize("model_class", ["transformer", "rnn", "lstm"])
def test_training_with_frozen_parameters_equals_the_reference(monkeypatch, model_class, frozen):
    """workingmem's freeze_embeddings (embedding and output layer), or a frozen
    first layer, through the CPU training call's own backward Functions
    (sizes lowered so they run here): the trainable parameters' gradients
    match the reference's, at the rows workingmem's loss reads, and the
    frozen ones get none."""
    monkeypatch.setattr(tail_eager, "MIN_TOKENS", 1)
    monkeypatch.setattr(mlp_eager, "MIN_FUSED_HIDDEN", 1)
    monkeypatch.setattr(rotary_eager, "MIN_FUSED_TOKENS", 1)
    monkeypatch.setattr(output_layer_eager, "MIN_PRODUCTS", 1)
    if model_class == "transformer":
        config = small_config(positional_embedding_type="rotary_qk")
    else:
        config = small_config(model_class=model_class, act_fn="tanh")
    reference, fast = reference_and_fast(config)
    first = {
        "transformer": "transformer_encoder.layers.0.",
        "rnn": "rnn_core.",
        "lstm": "lstm_core.",
    }
    prefixes = ("embedding.", "output_layer.") if frozen == "embeddings" else (first[model_class],)
    for name, param in reference.named_parameters():
        param.requires_grad_(not name.startswith(prefixes))
    ids = random_ids(11, config.d_vocab, 3, 16)
    rows = answer_rows(ids.shape[1])
    weight = torch.randn(3, len(rows), config.d_vocab, generator=torch.Generator().manual_seed(3))
    grads = {}
    calls = {
        f.__name__: count_applies(monkeypatch, f) for f in _CPU_TRAINING_FUNCTIONS[model_class]
    }
    for name, model in (("reference", reference), ("fast", fast)):
        for count in calls.values():
            count[0] = 0
        for param in reference.parameters():
            param.grad = None
        (model(ids)[:, rows] * weight).sum().backward()
        grads[name] = {n: p.grad for n, p in reference.named_parameters()}
        ran = {function for function, (count,) in calls.items() if count}
        assert ran == (set(calls) if name == "fast" else set()), ran  # fast took its own path
    for name, want in grads["reference"].items():
        got = grads["fast"][name]
        if name.startswith(prefixes):
            assert want is None and got is None, name
        else:
            torch.testing.assert_close(got, want, **FP32_GRADS, msg=lambda m, n=name: f"{n}: {m}")


# -- dropout, determinism -------------------------------------------------------------


def test_dropout_in_train_mode_keeps_the_references_distribution():
    """Compiled and eager dropout draw different random streams, so train-mode
    outputs with dropout > 0 cannot match bitwise. The contract instead: over
    many draws, fast and reference train-mode logits have the same mean and
    spread (within 5 standard errors), and both differ from eval mode."""
    config = small_config(positional_embedding_type="standard", dropout=0.3, d_model=16, n_heads=2)
    reference, fast = reference_and_fast(config)
    reference.train(), fast.train()
    ids = random_ids(8, 50, 1, 6)
    n = 300
    with torch.no_grad():
        torch.manual_seed(0)
        ref_draws = torch.stack([reference(ids) for _ in range(n)])
        fast_draws = torch.stack([fast(ids) for _ in range(n)])
        eval_logits = reference.eval()(ids)
    std_err = (ref_draws.var(0) / n + fast_draws.var(0) / n).sqrt()
    assert (
        (ref_draws.mean(0) - fast_draws.mean(0)).abs() <= 5 * std_err + 1e-6
    ).float().mean() > 0.99
    ratio = fast_draws.std(0).mean() / ref_draws.std(0).mean()
    assert 0.9 < ratio < 1.1, ratio
    assert (fast_draws - eval_logits).abs().amax(0).mean() > 0.1  # dropout is active


@pytest.mark.parametrize(
    "pe, d_mlp", [(pe, 48) for pe in POSITIONAL_TYPES] + [("rotary_qk", 0), (None, 0)]
)
@given(seed=st.integers(0, 2**31 - 1))
@example(seed=537033)  # pe None, d_mlp 48: a layer-1 ReLU input 6e-8 from zero (a kink)
def test_cpu_training_with_dropout_draws_the_references_masks(pe, d_mlp, seed):
    """The CPU training step runs uncompiled: from the same seed it draws the
    reference's dropout masks (nn.MultiheadAttention's output lies in memory
    as (T, B, d), which decides which position gets which draw; at d_mlp 0
    the feed-forward block's bias is broadcast, not written out, and its
    dropout still draws per position), so logits, gradients and the random
    state afterwards all match."""
    config = small_config(positional_embedding_type=pe, dropout=0.3, d_mlp=d_mlp, seed=seed % 997)
    reference, fast = reference_and_fast(config)
    ids = random_ids(seed, 50, 3, 11)

    def train_step(model):
        torch.manual_seed(seed)
        logits = model.train()(ids)
        grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()))
        return logits, grads, torch.random.get_rng_state()

    (ref_logits, ref_grads, ref_state), (logits, grads, state) = map(train_step, (reference, fast))
    torch.testing.assert_close(logits, ref_logits, **FP32_LOGITS)
    run = lambda: train_step(reference)[1]  # noqa: E731
    ref_grads = grads_across_relu_kinks(reference, run, grads, ref_grads, FP32_GRADS)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **FP32_GRADS)
    assert torch.equal(state, ref_state)
    with torch.no_grad():
        assert (logits - reference.eval()(ids)).abs().max() > 1e-2  # dropout was active


def _weights_after_training(device: str) -> list[torch.Tensor]:
    torch.manual_seed(11)
    config = small_config(positional_embedding_type="rotary_qk", dropout=0.1)
    model = build_model(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        loss = model.train()(random_ids(step, 50, 2, 9).to(device)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_cpu_training_reruns_are_bitwise_reproducible():
    first, second = _weights_after_training("cpu"), _weights_after_training("cpu")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_training_reruns_are_bitwise_in_deterministic_mode():
    import wmfast

    try:
        wmfast.set_deterministic(True)
        first, second = _weights_after_training("cuda"), _weights_after_training("cuda")
    finally:
        wmfast.set_deterministic(False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_deterministic_mode_sets_the_flags_and_keeps_cpu_reruns_bitwise():
    import wmfast

    try:
        wmfast.set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic
        test_cpu_training_reruns_are_bitwise_reproducible()
    finally:
        wmfast.set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()


# -- options and rules ----------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("compile", "sometimes"),
        ("mode", "fastest"),
        ("rotary", "cuda"),
        ("attention", "xformers"),
        ("norm", "apex"),
    ],
)
def test_bad_fast_options_are_clear_errors(field, value):
    with pytest.raises(ValueError, match=f"FastOptions.{field} must be one of"):
        FastOptions(**{field: value})


def test_missing_triton_or_flash_attn_is_a_clear_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(backends, "triton_installed", lambda: False)
    monkeypatch.setattr(backends, "flash_attn_installed", lambda: False)
    fast = build_model(
        small_config(positional_embedding_type="rotary_qk"),
        fast_options=FastOptions(rotary="triton"),
    )
    with pytest.raises(ImportError, match="pip install 'wmfast\\[triton\\]'"):
        fast(random_ids(0, 50, 1, 4))
    fast = build_model(small_config(), fast_options=FastOptions(norm="triton"))
    with pytest.raises(ImportError, match="norm='triton' needs triton"):
        fast(random_ids(0, 50, 1, 4))
    fast = build_model(small_config(), fast_options=FastOptions(attention="flash_attn"))
    with pytest.raises(ImportError, match="flash-attn"):
        fast(random_ids(0, 50, 1, 4))
    cuda = torch.device("cuda")
    assert backends.resolve_rotary("auto", cuda, torch.float32) == "torch"  # the documented rule
    assert backends.resolve_norm("auto", cuda, torch.float32, compiled_training=True) == "torch"


@pytest.mark.parametrize("option", ["rotary", "norm"])
def test_an_explicit_triton_choice_for_fp64_weights_is_a_clear_error(option, monkeypatch):
    # the kernels take fp32, fp16 and bf16; "auto" takes the PyTorch math for
    # fp64, but a user who named the kernel gets an error, not a fallback
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    config = small_config(positional_embedding_type="rotary_qk")
    reference = build_model(config, variant="reference").double()
    ids = random_ids(0, 50, 1, 4)
    named = make_fast(reference, **{option: "triton"})
    with pytest.raises(TypeError, match=f"{option}='triton' runs wmfast's Triton kernels.*float64"):
        named(ids)
    auto = make_fast(reference)
    torch.testing.assert_close(auto(ids), reference(ids), rtol=1e-9, atol=1e-10)


def test_device_rules():
    from wmfast.backends import resolve_attention, resolve_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cpu, grad_enabled=False) is True
    assert resolve_compile("auto", cpu, grad_enabled=True) is False
    assert resolve_compile("auto", cuda, grad_enabled=True) is True
    assert resolve_compile("never", cuda, grad_enabled=False) is False
    assert resolve_attention("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_attention("auto", cuda, torch.float32) == "sdpa"


def test_flash_attn_adapter_glue_matches_sdpa(monkeypatch):
    """The adapter's layout and arguments, checked with a stand-in flash_attn_func
    built on SDPA: (B, T, H, D) in and out, causal, dropout passed through."""
    import sys
    import types

    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, causal=False):
        calls.append((tuple(q.shape), dropout_p, causal))
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=dropout_p,
            is_causal=causal,
        )
        return out.transpose(1, 2)

    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func)
    )
    monkeypatch.setattr(backends, "flash_attn_installed", lambda: True)
    reference, fast = reference_and_fast(
        small_config(positional_embedding_type="rotary_qk", n_heads=2), attention="flash_attn"
    )
    assert_same_function(reference, fast, random_ids(2, 50, 3, 6))
    assert calls and calls[0] == ((3, 6, 2, 16), 0.0, True)


@pytest.mark.cuda
@pytest.mark.skipif(not wf.backends.flash_attn_installed(), reason="flash-attn not installed")
def test_real_flash_attn_matches_reference_under_autocast():
    reference, fast = reference_and_fast(
        small_config(positional_embedding_type="rotary_qk"), attention="flash_attn"
    )
    reference.cuda(), fast.cuda()
    ids = random_ids(0, 50, 2, 16).cuda()
    want = reference(ids).detach()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = fast(ids)
    torch.testing.assert_close(got.float(), want, **AUTOCAST_LOGITS)


@pytest.mark.cuda
def test_cuda_graphs_option_matches_reference():
    reference, fast = reference_and_fast(
        small_config(positional_embedding_type="rotary_qk"), mode="reduce-overhead"
    )
    reference.cuda().eval(), fast.cuda().eval()
    ids = random_ids(0, 50, 2, 16).cuda()
    with torch.no_grad():
        for _ in range(3):  # warm-up runs, then graph replays
            got = fast(ids).clone()
        torch.testing.assert_close(got, reference(ids), **FP32_LOGITS)
