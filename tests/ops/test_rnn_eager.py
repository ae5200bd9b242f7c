"""The Elman RNN with its backward through time written out
(wmfast.ops.rnn_eager) against nn.RNN, and where the fast RNN uses it."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from wmfast import build_model
from wmfast.ops import rnn_eager

from ..helpers import (
    FP32_GRADS,
    FP64_GRADS,
    count_applies,
    random_ids,
    reference_and_fast,
    small_config,
)


def _rnn(seed, d_in, hidden, layers, nonlinearity, dtype):
    torch.manual_seed(seed)
    return nn.RNN(d_in, hidden, layers, batch_first=True, nonlinearity=nonlinearity).to(dtype)


def _grads(output, inputs, seed):
    """Gradients of a random weighting of ``output`` with respect to ``inputs``
    (None for those that need none)."""
    weight = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed))
    wanted = [t for t in inputs if t.requires_grad]
    found = iter(torch.autograd.grad((output * weight.to(output)).sum(), wanted))
    return [next(found) if t.requires_grad else None for t in inputs]


@given(
    layers=st.integers(1, 3),
    d_in=st.integers(1, 12),
    hidden=st.integers(1, 12),
    batch=st.integers(1, 4),
    seq_len=st.sampled_from([1, 2, 5, 16]),
    nonlinearity=st.sampled_from(["relu", "tanh"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    frozen=st.sampled_from(["nothing", "input", "first_layer", "biases"]),
    seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_elman_rnn_equals_nn_rnn(
    layers, d_in, hidden, batch, seq_len, nonlinearity, dtype, frozen, seed
):
    rnn = _rnn(seed, d_in, hidden, layers, nonlinearity, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, seq_len, d_in, generator=gen).to(dtype)
    x.requires_grad_(frozen != "input")
    weights = rnn_eager.rnn_weights(rnn)
    for i, w in enumerate(weights):
        w.requires_grad_(
            not (frozen == "first_layer" and i < 4 or frozen == "biases" and i % 4 > 1)
        )

    got = rnn_eager.elman_rnn(x, weights, nonlinearity)
    want = rnn(x)[0]
    assert torch.equal(got, want)  # ATen's own forward, layer by layer: bit for bit
    tolerance = FP32_GRADS if dtype == torch.float32 else FP64_GRADS
    names = ["x"] + [f"weight {i}" for i in range(len(weights))]
    got_grads = _grads(got, [x, *weights], seed + 2)
    for name, g, w in zip(names, got_grads, _grads(want, [x, *weights], seed + 2), strict=True):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_gradcheck_and_gradgradcheck(nonlinearity):
    rnn = _rnn(0, 3, 4, 2, nonlinearity, torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    weights = rnn_eager.rnn_weights(rnn)

    def run(x, *weights):
        return rnn_eager.elman_rnn(x, weights, nonlinearity)

    assert torch.autograd.gradcheck(run, (x, *weights))
    assert torch.autograd.gradgradcheck(run, (x, *weights))


def test_the_two_bias_gradients_are_separate_tensors():
    """Both biases get the same values; one tensor for both would let the
    optimizer's update of one .grad reach the other."""
    rnn = _rnn(1, 3, 4, 1, "tanh", torch.float32)
    rnn_eager.rnn_forward(rnn, torch.randn(2, 3, 3)).sum().backward()
    assert torch.equal(rnn.bias_ih_l0.grad, rnn.bias_hh_l0.grad)
    assert rnn.bias_ih_l0.grad.data_ptr() != rnn.bias_hh_l0.grad.data_ptr()


def test_bad_arguments_are_named():
    rnn = _rnn(1, 3, 4, 1, "tanh", torch.float32)
    with pytest.raises(ValueError, match="nonlinearity"):
        rnn_eager.elman_rnn(torch.randn(1, 2, 3), rnn_eager.rnn_weights(rnn), "gelu")
    with pytest.raises(ValueError, match="4 weights per layer"):
        rnn_eager.elman_rnn(torch.randn(1, 2, 3), rnn_eager.rnn_weights(rnn)[:3], "tanh")


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: nn.LSTM(3, 4, batch_first=True), "not an nn.RNN"),
        (lambda: nn.RNN(3, 4, bias=False, batch_first=True), "no biases"),
        (lambda: nn.RNN(3, 4, bidirectional=True, batch_first=True), "two directions"),
        (lambda: nn.RNN(3, 4), "time-major"),
        (lambda: nn.RNN(3, 4, 2, dropout=0.5, batch_first=True), "dropout 0.5"),
    ],
)
def test_unsupported_modules_are_named(make, reason):
    assert reason in rnn_eager.unsupported(make())


def test_dropout_between_layers_only_matters_in_training():
    rnn = nn.RNN(3, 4, 2, dropout=0.5, batch_first=True)
    assert rnn_eager.unsupported(rnn.eval()) is None


# -- in the fast RNN --------------------------------------------------------------------


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_the_fast_rnn_trains_through_it_on_the_cpu(monkeypatch, nonlinearity):
    calls = count_applies(monkeypatch, rnn_eager._ElmanRNN)
    config = small_config(model_class="rnn", act_fn=nonlinearity)
    reference, fast = reference_and_fast(config)
    ids = random_ids(4, config.d_vocab, 3, 9)
    logits = fast.train()(ids)
    assert calls[0] == 1 and fast._fast.last_plan.recurrence == "bptt"
    assert torch.equal(logits, reference.train()(ids))
    with torch.no_grad():  # nothing to record: nn.RNN itself
        fast(ids)
    assert calls[0] == 1 and fast._fast.last_plan.recurrence == "module"


def test_the_fast_rnn_runs_nn_rnn_on_sequences_too_short_to_pay(monkeypatch):
    calls = count_applies(monkeypatch, rnn_eager._ElmanRNN)
    config = small_config(model_class="rnn")
    reference, fast = reference_and_fast(config)
    for seq_len, ran in ((rnn_eager.MIN_STEPS - 1, "module"), (rnn_eager.MIN_STEPS, "bptt")):
        ids = random_ids(seq_len, config.d_vocab, 3, seq_len)
        assert torch.equal(fast.train()(ids), reference.train()(ids))
        assert fast._fast.last_plan.recurrence == ran
    assert calls[0] == 1


def test_autocast_and_torch_func_take_the_module(monkeypatch):
    calls = count_applies(monkeypatch, rnn_eager._ElmanRNN)
    config = small_config(model_class="rnn", act_fn="tanh")
    _, fast = reference_and_fast(config)
    ids = random_ids(5, config.d_vocab, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(ids)
    params = dict(fast.named_parameters())
    torch.func.grad(lambda p: torch.func.functional_call(fast, p, (ids,)).sum())(params)
    assert calls[0] == 0


def test_an_edited_rnn_runs_its_modules_and_says_why(caplog):
    config = small_config(model_class="rnn", act_fn="tanh", n_layers=2)
    reference, fast = reference_and_fast(config)
    for model in (reference, fast):
        model.rnn_core.rnn.dropout = 0.5  # between the layers, in training
    ids = random_ids(6, config.d_vocab, 2, 5)
    with caplog.at_level(logging.WARNING, logger="wmfast"):
        torch.manual_seed(0)
        got = fast.train()(ids)
    torch.manual_seed(0)
    assert torch.equal(got, reference.train()(ids))  # the same dropout draws
    assert fast._fast.last_plan.attention == "none (module path)"
    assert "rnn_core.rnn has dropout 0.5" in caplog.text


def test_fast_lstm_keeps_its_core():
    config = small_config(model_class="lstm")
    model = build_model(config).train()
    model(random_ids(7, config.d_vocab, 2, 5))
    assert model._fast.last_plan.recurrence == "module"


def test_describe_names_the_edit():
    from wmfast.fast import describe

    config = small_config(model_class="rnn", act_fn="tanh", n_layers=2)
    _, fast = reference_and_fast(config)
    assert describe(fast)["module_path_reason"] is None
    assert describe(fast)["recurrence_with_grad"] == "bptt"
    assert describe(fast)["recurrence"] == "module"
    fast.rnn_core.rnn.dropout = 0.5
    assert (
        describe(fast.train())["module_path_reason"]
        == "rnn_core.rnn has dropout 0.5 between layers in training mode"
    )


@pytest.mark.parametrize("frozen_input", [False, True])
def test_gradients_of_gradients_match_nn_rnn(frozen_input):
    """A gradient penalty: backward through the gradients (create_graph=True)."""
    rnn = _rnn(3, 4, 5, 2, "tanh", torch.float64)
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=not frozen_input)
    weights = rnn_eager.rnn_weights(rnn)
    leaves = [t for t in (x, *weights) if t.requires_grad]

    def penalty_grads(output):
        grads = torch.autograd.grad(output.square().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)

    got = penalty_grads(rnn_eager.elman_rnn(x, weights, "tanh"))
    for g, w in zip(got, penalty_grads(rnn(x)[0]), strict=True):
        torch.testing.assert_close(g, w, **FP64_GRADS)


@pytest.mark.parametrize("model_class", ["rnn", "lstm"])
def test_cpu_training_reruns_are_bitwise_reproducible(monkeypatch, model_class):
    """The written-out backward and the answer-row output layer (forced on at
    this size) are deterministic: the same seed trains the same weights."""
    from wmfast.ops import output_layer_eager

    monkeypatch.setattr(output_layer_eager, "MIN_PRODUCTS", 0)

    def weights_after_training():
        torch.manual_seed(5)
        config = small_config(model_class=model_class, act_fn="tanh")
        model = build_model(config).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(3):
            logits = model(random_ids(step, config.d_vocab, 2, 12))[:, 3::4]
            logits.square().mean().backward()
            opt.step()
            opt.zero_grad()
        assert model._fast.last_plan.output_layer == "answer rows"
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(weights_after_training(), weights_after_training(), strict=True):
        assert torch.equal(a, b)
