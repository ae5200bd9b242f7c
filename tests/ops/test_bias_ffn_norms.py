"""The torch ops around the kernels of the two add & norms at d_mlp 0
(wmfast.ops.bias_ffn_norms): values and gradients of every input against the
composition they replace, dropout through the op's own masks, the bf16 copy
under autocast, the fallback where dtypes differ, torch.compile with no graph
break, clear errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ..helpers import (
    AUTOCAST_LOGITS,
    FP32_GRADS,
    FP32_LOGITS,
    STORAGE_TOLERANCE,
    RecordOps,
    assert_low_precision_grads_near_exact,
    assert_registered_ops_compute_the_same,
    count_applies,
    kernel_device,
)

pytestmark = pytest.mark.triton

EPS = 1e-5
NAMES = ("x", "y", "norm1_weight", "norm1_bias", "ffn_bias", "norm2_weight", "norm2_bias")


@pytest.fixture(scope="module")
def B():
    from wmfast.ops import bias_ffn_norms

    return bias_ffn_norms


def _composition(x, y, w1, b1, c, w2, b2, p=0.0, training=False):
    """What the reference layer computes at d_mlp 0: norm1, the bias-only
    feed-forward block (linear2's bias at every position), norm2."""
    d = x.shape[-1]
    x1 = F.layer_norm(x + F.dropout(y, p, training), (d,), w1, b1, EPS)
    return F.layer_norm(x1 + F.dropout(c.expand(x1.shape), p, training), (d,), w2, b2, EPS)


def _inputs(seed, shape, device, low=None):
    """(x, y, w1, b1, c, w2, b2) requiring grad, and an output gradient; y and c
    in ``low`` (a block's outputs under autocast) when given."""
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]

    def draw(*size, dtype=torch.float32):
        return torch.randn(size, generator=gen).to(device, dtype).requires_grad_()

    x, y = draw(*shape), draw(*shape, dtype=low or torch.float32)
    w1, b1, c = draw(d), draw(d), draw(d, dtype=low or torch.float32)
    w2, b2 = draw(d), draw(d)
    return (x, y, w1, b1, c, w2, b2), torch.randn(shape, generator=gen).to(device)


def _assert_grads_close(got, want, tolerance):
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.triton_loops
@given(
    shape=st.sampled_from([(1, 1, 4), (2, 5, 6), (3, 7, 48), (1, 9, 100)]),
    training=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_forward_and_grads_match_the_composition(B, shape, training, seed):
    """Without dropout (training with p 0, or p > 0 outside training) every
    value and every input's gradient matches the composition in fp32."""
    inputs, g = _inputs(seed, shape, kernel_device())
    p = 0.0 if training else 0.3  # training with p > 0 draws masks: tested below
    out, low = B.bias_ffn_norms(*inputs, EPS, p, training)
    want = _composition(*inputs, p, training)
    assert low is out  # no low dtype asked for: the same tensor
    torch.testing.assert_close(out, want, **FP32_LOGITS)
    got = torch.autograd.grad(out, inputs, g)
    _assert_grads_close(got, torch.autograd.grad(want, inputs, g), FP32_GRADS)


@pytest.mark.triton_loops
@given(p=st.sampled_from([0.1, 0.5]), seed=st.integers(0, 2**31 - 1))
def test_dropout_values_and_grads_follow_the_ops_own_masks(B, p, seed):
    device = kernel_device()
    shape = (2, 9, 24)
    inputs, g = _inputs(seed, shape, device)
    op = B._forward_traceable if device.type == "cuda" else B._forward_opaque
    seeds = torch.tensor([seed, seed + 1], device=device)
    out, _, _, keep1, keep2 = op(*inputs, seeds, p, EPS, torch.float32, None, True)
    for keep in (keep1, keep2):
        assert keep.dtype == torch.bool and 0 < keep.sum() < keep.numel()
    assert not torch.equal(keep1, keep2)  # two masks, not one twice
    got = torch.autograd.grad(out, inputs, g)

    x, y, w1, b1, c, w2, b2 = inputs
    x1 = F.layer_norm(x + y * keep1 / (1 - p), shape[-1:], w1, b1, EPS)
    want = F.layer_norm(x1 + c * keep2 / (1 - p), shape[-1:], w2, b2, EPS)
    torch.testing.assert_close(out, want, **FP32_LOGITS)
    _assert_grads_close(got, torch.autograd.grad(want, inputs, g), FP32_GRADS)
    assert torch.all(got[1][~keep1] == 0)  # dropped elements pass no gradient


def test_dropout_masks_come_from_torchs_generator(B):
    inputs, _ = _inputs(0, (2, 5, 16), kernel_device())
    with torch.no_grad():
        torch.manual_seed(3)
        first, _ = B.bias_ffn_norms(*inputs, EPS, 0.5, True)
        second, _ = B.bias_ffn_norms(*inputs, EPS, 0.5, True)
        torch.manual_seed(3)
        again, _ = B.bias_ffn_norms(*inputs, EPS, 0.5, True)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


@pytest.mark.triton_loops
def test_low_copy_under_autocast_and_every_gradient(B):
    """Under bf16 autocast (an fp32 residual stream, the attention output and
    the feed-forward bias in bf16): the output is fp32, the low copy is it in
    bf16, and the gradients reaching both add up as through the cast."""
    device = kernel_device()
    inputs, g = _inputs(1, (2, 7, 32), device, low=torch.bfloat16)
    g_low = g.flip(-1)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, low = B.bias_ffn_norms(*inputs, EPS, low_dtype=torch.bfloat16)
        want = _composition(*inputs)
    assert out.dtype == torch.float32 and low.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, **FP32_LOGITS)
    torch.testing.assert_close(low.float(), want, **AUTOCAST_LOGITS)
    got = torch.autograd.grad((out * g).sum() + (low.float() * g_low).sum(), inputs)
    loss = (want * g).sum() + (want.to(torch.bfloat16).float() * g_low).sum()
    _assert_grads_close(got, torch.autograd.grad(loss, inputs), AUTOCAST_LOGITS)


@pytest.mark.triton_loops
def test_a_bf16_model_computes_the_composition_to_bf16(B):
    """A model cast to bf16 (no autocast): every tensor and the fused op's
    output in bf16, norm1's output and both sums rounded to bf16 as the
    composition rounds them; values and gradients within bf16's steps."""
    inputs, g = _inputs(3, (2, 7, 40), kernel_device(), low=torch.bfloat16)
    inputs = tuple(t.detach().bfloat16().requires_grad_() for t in inputs)
    with RecordOps() as seen:
        out, low = B.bias_ffn_norms(*inputs, EPS)
    assert "bias_ffn_norms" in " ".join(seen.names) and low is out
    want = _composition(*inputs)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, **STORAGE_TOLERANCE[torch.bfloat16])
    g = g.bfloat16()
    got = torch.autograd.grad(out, inputs, g)
    assert all(grad.dtype == torch.bfloat16 for grad in got)
    torch_bf16 = torch.autograd.grad(want, inputs, g)
    exact_inputs = tuple(t.detach().double().requires_grad_() for t in inputs)
    exact = torch.autograd.grad(_composition(*exact_inputs), exact_inputs, g.double())
    assert_low_precision_grads_near_exact(NAMES, got, torch_bf16, exact)


@pytest.mark.triton_loops
def test_a_bf16_model_under_autocast_computes_the_composition(B):
    """A bf16 residual stream under CUDA's autocast would round norm1's output
    (fp32 there) to the sums' bf16: the fused kernel does not, so the op runs
    as two dropout_add_layer_norm. CPU's autocast keeps layer_norm in bf16,
    as the fused kernel does. Either way it computes the composition."""
    device = kernel_device()
    inputs, g = _inputs(2, (2, 5, 16), device, low=torch.bfloat16)
    inputs = (inputs[0].detach().bfloat16().requires_grad_(), *inputs[1:])
    with RecordOps() as seen, torch.autocast(device.type, dtype=torch.bfloat16):
        out, _ = B.bias_ffn_norms(*inputs, EPS)
        want = _composition(*inputs)
    names = " ".join(seen.names)
    fused = device.type == "cpu"
    assert ("bias_ffn_norms" in names) == fused
    assert ("dropout_add_layer_norm" in names) == (not fused)
    assert out.dtype == want.dtype
    torch.testing.assert_close(out.float(), want.float(), **AUTOCAST_LOGITS)
    got = torch.autograd.grad(out, inputs, g.to(out.dtype))
    want_grads = torch.autograd.grad(want, inputs, g.to(want.dtype))
    _assert_grads_close(got, want_grads, AUTOCAST_LOGITS)


def test_a_no_grad_call_launches_alone_and_computes_the_same(B, monkeypatch):
    inputs, _ = _inputs(6, (2, 5, 16), kernel_device())
    with_grad, _ = B.bias_ffn_norms(*inputs, EPS)
    applies = count_applies(monkeypatch, B._BiasFfnNormsEager)
    with torch.no_grad():
        out, low = B.bias_ffn_norms(*inputs, EPS)
    assert applies == [0] and out.grad_fn is None and low is out
    assert torch.equal(out, with_grad.detach())


def test_a_backward_with_create_graph_is_a_clear_error(B):
    """No double backward (see test_layer_norm's): a clear error."""
    inputs, g = _inputs(7, (2, 5, 16), kernel_device())
    out, _ = B.bias_ffn_norms(*inputs, EPS)
    with pytest.raises(RuntimeError, match=r"no double backward.*norm='torch'"):
        torch.autograd.grad(out, inputs, g, create_graph=True)


@pytest.mark.triton_loops
def test_registered_ops_compute_what_the_eager_function_computes(B):
    device = kernel_device()
    inputs, g = _inputs(4, (2, 5, 16), device, low=torch.bfloat16)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out, low = B.bias_ffn_norms(*inputs, EPS, low_dtype=torch.bfloat16)
        loss = (out * g).sum() + (low.float() * g.flip(-1)).sum()
        return (out, low), torch.autograd.grad(loss, inputs)

    assert_registered_ops_compute_the_same(
        run, ("wmfast.bias_ffn_norms", "wmfast.bias_ffn_norms_backward")
    )


@pytest.mark.triton_loops
def test_compiles_with_no_graph_break_forward_and_backward(B):
    inputs, g = _inputs(2, (2, 5, 16), kernel_device())

    def step(x, y, w1, b1, c, w2, b2, p):
        out, _ = B.bias_ffn_norms(x, y, w1, b1, c, w2, b2, EPS, p, True)
        return (out * g).sum()

    explanation = torch._dynamo.explain(step)(*inputs, 0.2)  # the dropout seeds too
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True)(*inputs, 0.0)
    eager_loss = step(*inputs, 0.0)
    torch.testing.assert_close(loss, eager_loss, **FP32_LOGITS)
    got = torch.autograd.grad(loss, inputs)
    _assert_grads_close(got, torch.autograd.grad(eager_loss, inputs), FP32_GRADS)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(c=(5,)), ValueError, "ffn_bias must have shape (16,); got (5,)"),
        (dict(w2=(16, 1)), ValueError, "norm2_weight must have shape (16,)"),
        (dict(y=(2, 4, 16)), ValueError, "x and y must have one shape"),
        (dict(p=1.0), ValueError, "dropout probability must be in [0, 1)"),
    ],
)
def test_bad_inputs_are_named(B, change, error, message):
    inputs, _ = _inputs(0, (2, 5, 16), kernel_device())
    x, y, w1, b1, c, w2, b2 = (t.detach() for t in inputs)
    if "c" in change:
        c = torch.randn(change["c"], device=x.device)
    if "w2" in change:
        w2 = torch.randn(change["w2"], device=x.device)
    if "y" in change:
        y = torch.randn(change["y"], device=x.device)
    with pytest.raises(error, match=re.escape(message)):
        B.bias_ffn_norms(x, y, w1, b1, c, w2, b2, EPS, change.get("p", 0.1), True)
