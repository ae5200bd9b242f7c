"""The output layer with a backward over the rows the loss reads
(wmfast.ops.output_layer_eager) against F.linear, and where the fast RNN and
LSTM use it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from wmfast.ops import output_layer_eager

from ..helpers import (
    FP32_GRADS,
    FP64_GRADS,
    count_applies,
    random_ids,
    reference_and_fast,
    small_config,
)

# which rows of the logits' gradient are nonzero: workingmem's answers, all,
# none, or a few scattered ones
ROW_PATTERNS = ["every_4th", "all", "none", "scattered"]


def _row_mask(pattern: str, rows: int, gen: torch.Generator) -> torch.Tensor:
    if pattern == "every_4th":
        return torch.arange(rows) % 4 == 3
    if pattern == "scattered":
        return torch.rand(rows, generator=gen) < 0.2
    return torch.full((rows,), pattern == "all")


def _tensors(seed, batch, seq_len, d, vocab, dtype):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, seq_len, d), (vocab, d), (vocab,)]
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes], gen


def _grads(fn, tensors, needs, grad_out):
    leaves = [t.clone().requires_grad_(need) for t, need in zip(tensors, needs, strict=True)]
    out = fn(*leaves)
    out.backward(grad_out)
    return out, [leaf.grad for leaf in leaves]


@given(
    batch=st.integers(1, 3),
    seq_len=st.sampled_from([1, 4, 9, 16]),
    d=st.integers(1, 12),
    vocab=st.integers(1, 20),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    pattern=st.sampled_from(ROW_PATTERNS),
    needs=st.sampled_from([(True, True, True), (True, False, False), (False, True, True)]),
    seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_output_layer_equals_f_linear(batch, seq_len, d, vocab, dtype, pattern, needs, seed):
    tensors, gen = _tensors(seed, batch, seq_len, d, vocab, dtype)
    grad_out = torch.randn(batch, seq_len, vocab, generator=gen).to(dtype)
    grad_out *= _row_mask(pattern, batch * seq_len, gen).view(batch, seq_len, 1)
    out, grads = _grads(output_layer_eager._OutputLayer.apply, tensors, needs, grad_out)
    want, want_grads = _grads(F.linear, tensors, needs, grad_out)
    assert torch.equal(out, want)  # F.linear itself
    tolerance = FP32_GRADS if dtype == torch.float32 else FP64_GRADS
    for got, expected in zip(grads, want_grads, strict=True):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected, **tolerance)
    if needs[0]:  # rows the loss does not read: exactly zero, as autograd's
        unread = grad_out.eq(0).all(-1)
        assert grads[0][unread].eq(0).all()


def test_a_non_finite_input_takes_every_row():
    """0 * inf is NaN: autograd's products turn an inf on an unread row into
    NaNs in the weight's gradient, and so must this backward."""
    tensors, gen = _tensors(1, 2, 8, 4, 5, torch.float32)
    tensors[0][0, 0, 0] = float("inf")  # row 0: not read
    grad_out = torch.randn(2, 8, 5, generator=gen) * (torch.arange(8) % 4 == 3).view(1, 8, 1)
    _, grads = _grads(output_layer_eager._OutputLayer.apply, tensors, (True,) * 3, grad_out)
    _, want = _grads(F.linear, tensors, (True,) * 3, grad_out)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=0)
    assert grads[1].isnan().any()


def test_gradients_of_gradients_match_f_linear():
    tensors, gen = _tensors(2, 2, 8, 4, 5, torch.float64)
    leaves = [t.requires_grad_() for t in tensors]
    mask = (torch.arange(8) % 4 == 3).view(1, 8, 1)

    def penalty_grads(fn):
        grads = torch.autograd.grad((fn(*leaves) * mask).square().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)

    got = penalty_grads(output_layer_eager._OutputLayer.apply)
    for g, w in zip(got, penalty_grads(F.linear), strict=True):
        torch.testing.assert_close(g, w, **FP64_GRADS)


@pytest.mark.parametrize("case", ["no_grad", "autocast", "no_bias", "mixed_dtypes"])
def test_where_the_plain_op_runs(monkeypatch, case):
    calls = count_applies(monkeypatch, output_layer_eager._OutputLayer)
    monkeypatch.setattr(output_layer_eager, "MIN_PRODUCTS", 0)
    (x, weight, bias), _ = _tensors(3, 2, 4, 3, 5, torch.float32)
    weight.requires_grad_()
    if case == "no_bias":
        bias = None
    if case == "mixed_dtypes":
        x = x.double()
    with torch.set_grad_enabled(case != "no_grad"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
            try:
                output_layer_eager.output_layer(x, weight, bias)
            except RuntimeError:  # F.linear refuses mixed dtypes itself
                assert case == "mixed_dtypes"
    assert calls[0] == 0
    output_layer_eager.output_layer(x.float(), weight, torch.zeros(5))
    assert calls[0] == 1


@pytest.mark.parametrize("rows, takes_it", [(2**14, True), (2**14 - 1, False)])
def test_layers_from_min_products_up_take_it(monkeypatch, rows, takes_it):
    calls = count_applies(monkeypatch, output_layer_eager._OutputLayer)
    (x, weight, bias), _ = _tensors(4, 1, rows, 64, 64, torch.float32)  # 2^12 per row
    out = output_layer_eager.output_layer(x, weight.requires_grad_(), bias)
    assert calls[0] == int(takes_it)
    assert torch.equal(out, F.linear(x, weight, bias))


# -- in the fast RNN and LSTM -----------------------------------------------------------


@pytest.mark.parametrize("model_class", ["rnn", "lstm"])
def test_fast_recurrent_models_train_through_it(monkeypatch, model_class):
    """The answer loss (every 4th position, as workingmem's) on the CPU: the
    fast model's gradients match the reference's."""
    calls = count_applies(monkeypatch, output_layer_eager._OutputLayer)
    monkeypatch.setattr(output_layer_eager, "MIN_PRODUCTS", 0)  # small_config is far below it
    config = small_config(model_class=model_class, act_fn="relu")
    reference, fast = reference_and_fast(config)
    ids = random_ids(3, config.d_vocab, 3, 12)
    targets = random_ids(4, config.d_vocab, 3, 3)

    def answer_loss(model):
        logits = model.train()(ids)[:, 3::4]  # (B, 3, vocab)
        return F.cross_entropy(logits.reshape(-1, config.d_vocab), targets.reshape(-1))

    params = [p for p in reference.parameters()]
    want = torch.autograd.grad(answer_loss(reference), params)
    got = torch.autograd.grad(answer_loss(fast), params)
    assert calls[0] == 1 and fast._fast.last_plan.output_layer == "answer rows"
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **FP32_GRADS)


def test_a_replaced_output_layer_runs_the_modules(caplog):
    config = small_config(model_class="lstm")
    reference, fast = reference_and_fast(config)
    for model in (reference, fast):
        model.output_layer = torch.nn.Sequential(model.output_layer, torch.nn.Tanh())
    ids = random_ids(5, config.d_vocab, 2, 8)
    with caplog.at_level("WARNING", logger="wmfast"):
        assert torch.equal(fast.train()(ids), reference.train()(ids))
    assert fast._fast.last_plan.attention == "none (module path)"
    assert "output_layer is not an nn.Linear with a bias" in caplog.text


def test_describe_names_a_replaced_output_layer_only_where_it_matters():
    from wmfast.fast import describe

    _, fast = reference_and_fast(small_config(model_class="rnn"))
    fast.output_layer = torch.nn.Sequential(fast.output_layer)
    assert describe(fast)["module_path_reason"] == "output_layer is not an nn.Linear with a bias"
    # on CUDA the modules run anyway: nothing to explain
    assert describe(fast, "cuda")["module_path_reason"] is None
    assert describe(fast, "cuda")["output_layer_with_grad"] == "module"
