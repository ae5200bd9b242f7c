"""The torch ops around the dropout + add + LayerNorm kernels: values and
gradients against the composition they replace, the bf16 copy under autocast,
dropout through the op's own mask, torch.compile with no graph break."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ..helpers import (
    AUTOCAST_LOGITS,
    FP32_GRADS,
    FP32_LOGITS,
    assert_low_precision_grads_near_exact,
    assert_registered_ops_compute_the_same,
    count_applies,
    kernel_device,
)

pytestmark = pytest.mark.triton

EPS = 1e-5


@pytest.fixture(scope="module")
def L():
    from wmfast.ops import layer_norm

    return layer_norm


def _composition(x, y, weight, bias, p=0.0, training=False):
    """What the reference layer computes (transformer_functional.torch_add_norm)."""
    return F.layer_norm(x + F.dropout(y, p, training), x.shape[-1:], weight, bias, EPS)


def _inputs(seed, shape, device, y_rows="own", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    n_cols = shape[-1]
    x = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
    if y_rows == "broadcast":  # the d_mlp 0 block's bias, expanded over the positions
        y = torch.randn(n_cols, generator=gen).to(device, dtype).requires_grad_()
    else:
        y = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
    weight = torch.randn(n_cols, generator=gen).to(device).requires_grad_()
    bias = torch.randn(n_cols, generator=gen).to(device).requires_grad_()
    g = torch.randn(shape, generator=gen).to(device)
    return x, y, weight, bias, g


def _assert_grads_close(got_grads, want_grads, tolerance):
    """The gradients of (x, y, weight, bias): same dtypes, values within ``tolerance``."""
    for name, got, wanted in zip("x y weight bias".split(), got_grads, want_grads, strict=True):
        assert got.dtype == wanted.dtype, name
        torch.testing.assert_close(got, wanted, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


def _expand(y, shape):
    return y.expand(shape) if y.shape != shape else y


@pytest.mark.triton_loops
@given(
    shape=st.sampled_from([(1, 1, 4), (2, 5, 6), (3, 7, 48), (1, 9, 100)]),
    y_rows=st.sampled_from(["own", "broadcast"]),
    training=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_op_forward_and_grads_match_the_composition(L, shape, y_rows, training, seed):
    """Without dropout (p 0, or p > 0 outside training) every value and gradient
    matches layer_norm(x + y) in fp32."""
    device = kernel_device()
    x, y, weight, bias, g = _inputs(seed, shape, device, y_rows)
    p = 0.0 if training else 0.3  # training with p > 0 draws masks: tested below
    inputs = (x, y, weight, bias)

    out, low = L.dropout_add_layer_norm(x, _expand(y, shape), weight, bias, EPS, p, training)
    want = _composition(x, _expand(y, shape), weight, bias, p, training)
    assert low is out  # no low dtype asked for: the same tensor
    torch.testing.assert_close(out, want, **FP32_LOGITS)
    got_grads = torch.autograd.grad(out, inputs, g)
    want_grads = torch.autograd.grad(want, inputs, g)
    _assert_grads_close(got_grads, want_grads, FP32_GRADS)


@pytest.mark.triton_loops
@given(p=st.sampled_from([0.1, 0.5]), seed=st.integers(0, 2**31 - 1))
def test_dropout_values_and_grads_follow_the_ops_own_mask(L, p, seed):
    device = kernel_device()
    shape = (2, 9, 24)
    x, y, weight, bias, g = _inputs(seed, shape, device)
    op = L._forward_traceable if device.type == "cuda" else L._forward_opaque
    seed_t = torch.tensor([seed], device=device)
    out, _, _, keep = op(x, y, weight, bias, seed_t, p, EPS, torch.float32, None, True)
    assert keep.dtype == torch.bool and 0 < keep.sum() < keep.numel()
    inputs = (x, y, weight, bias)
    got_grads = torch.autograd.grad(out, inputs, g)

    want = F.layer_norm(x + y * keep / (1 - p), shape[-1:], weight, bias, EPS)
    torch.testing.assert_close(out, want, **FP32_LOGITS)
    want_grads = torch.autograd.grad(want, inputs, g)
    _assert_grads_close(got_grads, want_grads, FP32_GRADS)
    assert torch.all(got_grads[1][~keep] == 0)  # dropped elements pass no gradient


def test_dropout_masks_come_from_torchs_generator(L):
    """A fresh mask per call, and the same mask after the same manual_seed."""
    device = kernel_device()
    x, y, weight, bias, _ = _inputs(0, (2, 5, 16), device)
    with torch.no_grad():
        torch.manual_seed(3)
        first, _ = L.dropout_add_layer_norm(x, y, weight, bias, EPS, 0.5, True)
        second, _ = L.dropout_add_layer_norm(x, y, weight, bias, EPS, 0.5, True)
        torch.manual_seed(3)
        again, _ = L.dropout_add_layer_norm(x, y, weight, bias, EPS, 0.5, True)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


@pytest.mark.triton_loops
def test_low_copy_under_autocast_and_both_gradients(L):
    """Under bf16 autocast: the output is fp32 (as autocast's layer_norm), the
    low copy is that output in bf16, and the gradients reaching both add up as
    they would through the cast the copy replaces."""
    device = kernel_device()
    shape = (2, 7, 32)
    x, y, weight, bias, g = _inputs(1, shape, device)
    y_low = y.detach().to(torch.bfloat16).requires_grad_()  # a block's output under autocast
    g_low = g.flip(-1)
    inputs = (x, y_low, weight, bias)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, low = L.dropout_add_layer_norm(x, y_low, weight, bias, EPS, low_dtype=torch.bfloat16)
        want = _composition(x, y_low, weight, bias)
    assert out.dtype == torch.float32 and low.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, **FP32_LOGITS)
    torch.testing.assert_close(low.float(), want, **AUTOCAST_LOGITS)
    got_grads = torch.autograd.grad((out * g).sum() + (low.float() * g_low).sum(), inputs)
    loss = (want * g).sum() + (want.to(torch.bfloat16).float() * g_low).sum()
    want_grads = torch.autograd.grad(loss, inputs)
    _assert_grads_close(got_grads, want_grads, AUTOCAST_LOGITS)


@pytest.mark.triton_loops
def test_a_bf16_stream_under_autocast_keeps_the_compositions_dtype(L):
    """bf16 x and y under bf16 autocast: CUDA's autocast runs layer_norm in
    fp32, CPU's leaves it in bf16; the op's output takes the same dtype on
    each, with the composition's values and gradients."""
    device = kernel_device()
    x, y, weight, bias, g = _inputs(3, (2, 7, 32), device, dtype=torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, low = L.dropout_add_layer_norm(x, y, weight, bias, EPS)
        want = _composition(x, y, weight, bias)
    expected = torch.float32 if device.type == "cuda" else torch.bfloat16
    assert want.dtype == expected and out.dtype == expected and low is out
    torch.testing.assert_close(out.float(), want.float(), **AUTOCAST_LOGITS)
    inputs = (x, y, weight, bias)
    got = torch.autograd.grad(out, inputs, g.to(out.dtype))
    torchs = torch.autograd.grad(want, inputs, g.to(want.dtype))
    exact_inputs = tuple(t.detach().double().requires_grad_() for t in inputs)
    exact = torch.autograd.grad(_composition(*exact_inputs), exact_inputs, g.double())
    assert_low_precision_grads_near_exact("x y weight bias".split(), got, torchs, exact)


def test_a_no_grad_call_launches_alone_and_computes_the_same(L, monkeypatch):
    device = kernel_device()
    x, y, weight, bias, _ = _inputs(5, (2, 5, 16), device)
    with_grad, _ = L.dropout_add_layer_norm(x, y, weight, bias, EPS)
    applies = count_applies(monkeypatch, L._DropoutAddLayerNormEager)
    with torch.no_grad():
        out, low = L.dropout_add_layer_norm(x, y, weight, bias, EPS)
    assert applies == [0] and out.grad_fn is None and low is out
    assert torch.equal(out, with_grad.detach())


def test_a_backward_with_create_graph_is_a_clear_error(L):
    """The backward kernel writes gradients from the saved sum, not from the
    inputs, so there is no double backward: an error naming the way to one,
    rather than gradients that autograd would take as constants."""
    x, y, weight, bias, g = _inputs(7, (2, 5, 16), kernel_device())
    out, _ = L.dropout_add_layer_norm(x, y, weight, bias, EPS)
    with pytest.raises(RuntimeError, match=r"no double backward.*norm='torch'"):
        torch.autograd.grad(out, (x, y, weight, bias), g, create_graph=True)


@pytest.mark.triton_loops
def test_registered_ops_compute_what_the_eager_function_computes(L):
    # as in tests/ops/test_rotary.py: under a tensor mode the registered ops run
    device = kernel_device()
    x, y, weight, bias, g = _inputs(4, (2, 5, 16), device)
    inputs = (x, y, weight, bias)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out, low = L.dropout_add_layer_norm(x, y, weight, bias, EPS, low_dtype=torch.bfloat16)
        loss = (out * g).sum() + (low.float() * g.flip(-1)).sum()
        return (out, low), torch.autograd.grad(loss, inputs)

    assert_registered_ops_compute_the_same(
        run, ("wmfast.dropout_add_layer_norm", "wmfast.dropout_add_layer_norm_backward")
    )


@pytest.mark.triton_loops
def test_compiles_with_no_graph_break_forward_and_backward(L):
    device = kernel_device()
    x, y, weight, bias, g = _inputs(2, (2, 5, 16), device)

    def step(x, y, weight, bias, p):
        out, _ = L.dropout_add_layer_norm(x, y, weight, bias, EPS, p, True)
        return (out * g).sum()

    explanation = torch._dynamo.explain(step)(x, y, weight, bias, 0.2)  # dropout's seed too
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    inputs = (x, y, weight, bias)
    loss = compiled(*inputs, 0.0)
    grads = torch.autograd.grad(loss, inputs)
    eager_loss = step(*inputs, 0.0)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    torch.testing.assert_close(loss, eager_loss, **FP32_LOGITS)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, **FP32_GRADS)
