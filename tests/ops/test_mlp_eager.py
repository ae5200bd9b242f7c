"""The in-place ReLU feed-forward block (wmfast.ops.mlp_eager) against the
composition it replaces, and where the fast path uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from wmfast import build_model
from wmfast.ops import mlp_eager

from ..helpers import DEVICES, FP32_GRADS, FP32_LOGITS, count_applies, random_ids, small_config


def _composition(x, w1, b1, w2, b2):
    return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)


def _inputs(seed, batch, seq_len, d_model, d_mlp, dtype, device):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, seq_len, d_model), (d_mlp, d_model), (d_mlp,), (d_model, d_mlp), (d_model,)]
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def _run(fn, tensors, needs_grad, grad_seed):
    leaves = [t.clone().requires_grad_(need) for t, need in zip(tensors, needs_grad, strict=True)]
    out = fn(*leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    (out * weight.to(out)).sum().backward()
    return out, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("device", DEVICES)
@given(
    batch=st.integers(1, 3),
    seq_len=st.sampled_from([1, 3, 7, 16]),
    d_model=st.sampled_from([2, 8, 24]),
    d_mlp=st.sampled_from([0, 1, 8, 40]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    needs_grad=st.sampled_from([(True,) * 5, (True, False, False, False, False), (False, True, True, True, True)]),
    seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_in_place_kernels_equal_the_composition(
    device, batch, seq_len, d_model, d_mlp, dtype, needs_grad, seed
):
    tensors = _inputs(seed, batch, seq_len, d_model, d_mlp, dtype, device)
    out, grads = _run(mlp_eager._ReluMLP.apply, tensors, needs_grad, seed + 1)
    want, want_grads = _run(_composition, tensors, needs_grad, seed + 1)
    if device == "cpu":  # the same products in the same order: bit for bit
        assert torch.equal(out, want)
        for got, expected in zip(grads, want_grads, strict=True):
            assert (got is None) == (expected is None)
            assert got is None or torch.equal(got, expected)
    else:
        torch.testing.assert_close(out, want, **FP32_LOGITS)
        for got, expected in zip(grads, want_grads, strict=True):
            assert (got is None) == (expected is None)
            if got is not None:
                torch.testing.assert_close(got, expected, **FP32_GRADS)


def test_torch_func_transforms_take_the_composition(monkeypatch):
    """The in-place Function has no functorch rules: under torch.func.grad a
    block at the fused size must run the composition, with its gradients."""
    calls = count_applies(monkeypatch, mlp_eager._ReluMLP)
    d_model, d_mlp = 4, mlp_eager.MIN_FUSED_HIDDEN // 2**12
    x, w1, b1, w2, b2 = _inputs(3, 1, 2**12, d_model, d_mlp, torch.float32, "cpu")

    def loss(w1):
        return mlp_eager.relu_mlp(x, w1, b1, w2, b2).square().mean()

    got = torch.func.grad(loss)(w1)
    assert calls[0] == 0
    want = torch.func.grad(lambda w: _composition(x, w, b1, w2, b2).square().mean())(w1)
    torch.testing.assert_close(got, want, **FP32_GRADS)
    mlp_eager.relu_mlp(x, w1, b1, w2, b2)  # outside a transform: the fused kernels
    assert calls[0] == 1


@pytest.mark.parametrize("tokens, fused", [(2**12, True), (2**12 - 1, False)])
def test_blocks_from_min_fused_hidden_up_take_the_in_place_kernels(monkeypatch, tokens, fused):
    calls = count_applies(monkeypatch, mlp_eager._ReluMLP)
    d_mlp = mlp_eager.MIN_FUSED_HIDDEN // 2**12
    tensors = _inputs(5, 1, tokens, 4, d_mlp, torch.float32, "cpu")
    out = mlp_eager.relu_mlp(*tensors)
    assert calls[0] == int(fused)
    assert torch.equal(out, _composition(*tensors))


def test_autocast_takes_the_composition(monkeypatch):
    calls = count_applies(monkeypatch, mlp_eager._ReluMLP)
    monkeypatch.setattr(mlp_eager, "MIN_FUSED_HIDDEN", 0)
    tensors = _inputs(3, 2, 5, 8, 16, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp_eager.relu_mlp(*tensors)
        want = _composition(*tensors)
    assert calls[0] == 0
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


@pytest.mark.parametrize(
    "changes, train, fused_per_call",
    [
        # dropout 0 or eval: every layer but the last, whose feed-forward
        # block runs inside tail_eager's tail
        (dict(), True, 1),
        (dict(), False, 1),
        (dict(dropout=0.1), False, 1),  # eval: dropout is the identity
        (dict(dropout=0.1), True, 0),  # dropout between the two linears
        (dict(act_fn="gelu"), True, 0),
    ],
)
def test_fast_transformer_uses_it_where_nothing_needs_linear1s_output(
    monkeypatch, changes, train, fused_per_call
):
    calls = count_applies(monkeypatch, mlp_eager._ReluMLP)
    monkeypatch.setattr(mlp_eager, "MIN_FUSED_HIDDEN", 0)  # small_config is far below it
    config = small_config(positional_embedding_type="rotary_qk", **changes)
    model = build_model(config).train(train)  # fast, CPU: with grad it runs uncompiled
    logits = model(random_ids(0, config.d_vocab, 2, 9))
    logits.sum().backward()
    assert calls[0] == fused_per_call
