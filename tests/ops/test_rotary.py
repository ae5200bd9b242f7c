"""The torch ops around the rotary kernels: gradients against the pure-torch
reference (autograd), torch.compile with no graph break, the in-place variant."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from wmfast import functional as WF

from ..helpers import (
    FP32_GRADS,
    FP32_LOGITS,
    assert_registered_ops_compute_the_same,
    count_applies,
    kernel_device,
)

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def R():
    from wmfast.ops import rotary

    return rotary


@given(
    batch=st.integers(1, 3),
    seq_len=st.sampled_from([1, 3, 7, 16]),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([2, 8, 48, 96]),
    table_grads=st.booleans(),
    broadcast=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_rotary_qk_op_forward_and_grads_match_reference(
    R, batch, seq_len, heads, head_dim, table_grads, broadcast, seed
):
    gen = torch.Generator().manual_seed(seed)
    device = kernel_device()
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen).to(device).requires_grad_()
    if broadcast:
        cos, sin = WF.rotary_tables(seq_len, WF.rotary_inv_freq(head_dim).to(device))
    else:
        cos, sin = WF.rotary_qk_tables(batch, seq_len, WF.rotary_inv_freq(head_dim).to(device))
    cos, sin = cos.clone().requires_grad_(table_grads), sin.clone().requires_grad_(table_grads)
    w_q = torch.randn(batch, seq_len, heads, head_dim, generator=gen).to(device)
    w_k = torch.randn(batch, seq_len, heads, head_dim, generator=gen).to(device)
    inputs = (qkv, cos, sin) if table_grads else (qkv,)

    def run(fn):
        q, k = fn(qkv[:, :, 0], qkv[:, :, 1], cos, sin)
        loss = (q * w_q).sum() + (k * w_k).sum()
        return (q, k), torch.autograd.grad(loss, inputs)

    (q, k), grads = run(R.rotary_qk)
    (q_ref, k_ref), grads_ref = run(WF.rotary_qk)
    torch.testing.assert_close(q, q_ref, **FP32_LOGITS)
    torch.testing.assert_close(k, k_ref, **FP32_LOGITS)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, **FP32_GRADS)


@given(
    batch=st.integers(1, 3),
    seq_len=st.sampled_from([1, 4, 9]),
    d_model=st.sampled_from([8, 48, 130]),
    table_grads=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_embedding_rotation_op_forward_and_grads_match_reference(
    R, batch, seq_len, d_model, table_grads, seed
):
    gen = torch.Generator().manual_seed(seed)
    device = kernel_device()
    emb = torch.randn(batch, seq_len, d_model, generator=gen).to(device).requires_grad_()
    cos, sin = WF.rotary_tables(seq_len, WF.rotary_inv_freq(d_model).to(device))
    cos, sin = cos.clone().requires_grad_(table_grads), sin.clone().requires_grad_(table_grads)
    weight = torch.randn(batch, seq_len, d_model, generator=gen).to(device)
    inputs = (emb, cos, sin) if table_grads else (emb,)
    scale = d_model**0.5

    fused = R.embedding_rotation(emb, cos, sin, scale=scale)
    # the reference model's steps: scale, then x + pos_encoder(x)
    x = emb * scale
    eager = x + WF.rotate_pairs(x, cos, sin)
    torch.testing.assert_close(fused, eager, **FP32_LOGITS)
    got = torch.autograd.grad((fused * weight).sum(), inputs)
    want = torch.autograd.grad((eager * weight).sum(), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **FP32_GRADS)

    # the rotation term alone, as pos_encoder.output on the traced path
    term = R.embedding_rotation(x.detach(), cos.detach(), sin.detach(), add_input=False)
    torch.testing.assert_close(
        term, WF.rotate_pairs(x.detach(), cos.detach(), sin.detach()), **FP32_LOGITS
    )


def test_grads_of_grads_and_calls_that_record_no_graph(R, monkeypatch):
    # an eager backward without create_graph launches the kernel directly
    # (no autograd.Function); with create_graph it must still record the
    # rotation, so the gradient of a gradient matches the reference's
    gen = torch.Generator().manual_seed(11)
    device = kernel_device()
    qkv = torch.randn(2, 5, 3, 2, 8, generator=gen).to(device).requires_grad_()
    emb = torch.randn(2, 5, 16, generator=gen).to(device).requires_grad_()
    w_qk = torch.randn(2, 5, 2, 8, generator=gen).to(device).requires_grad_()
    w_emb = torch.randn(2, 5, 16, generator=gen).to(device).requires_grad_()
    v_qkv, v_emb = torch.randn_like(qkv), torch.randn_like(emb)
    cos, sin = WF.rotary_tables(5, WF.rotary_inv_freq(8).to(device))
    cos_e, sin_e = WF.rotary_tables(5, WF.rotary_inv_freq(16).to(device))

    def embedding_rotation_reference(x, cos, sin, scale):
        return x * scale + WF.rotate_pairs(x * scale, cos, sin)

    def run(rotary_qk, embedding_rotation):
        q, k = rotary_qk(qkv[:, :, 0], qkv[:, :, 1], cos, sin)
        x = embedding_rotation(emb, cos_e, sin_e, scale=4.0)
        loss = (q * w_qk).sum() + (k * w_qk.flip(0)).sum() + (x * w_emb).sum()
        d_qkv, d_emb = torch.autograd.grad(loss, (qkv, emb), create_graph=True)
        return torch.autograd.grad((d_qkv * v_qkv).sum() + (d_emb * v_emb).sum(), (w_qk, w_emb))

    got = run(R.rotary_qk, R.embedding_rotation)
    want = run(WF.rotary_qk, embedding_rotation_reference)
    for g, w in zip(got, want, strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, w, **FP32_GRADS)

    applies = [count_applies(monkeypatch, f) for f in (R._RotaryQKEager, R._EmbeddingRotationEager)]
    with torch.no_grad():
        q, k = R.rotary_qk(qkv[:, :, 0], qkv[:, :, 1], cos, sin)
        x = R.embedding_rotation(emb, cos_e, sin_e, scale=4.0)
    assert q.grad_fn is None and k.grad_fn is None and x.grad_fn is None
    assert applies == [[0], [0]]  # the launchers alone
    torch.testing.assert_close(
        (q, k), WF.rotary_qk(qkv[:, :, 0].detach(), qkv[:, :, 1].detach(), cos, sin), **FP32_LOGITS
    )
    torch.testing.assert_close(
        x, embedding_rotation_reference(emb.detach(), cos_e, sin_e, 4.0), **FP32_LOGITS
    )


def test_registered_ops_compute_what_the_eager_functions_compute(R):
    # eager calls skip torch.library (wmfast.ops._eager); under a tensor mode
    # (and in compiled code) the registered ops run: the same kernels, the same
    # numbers, forward and backward
    gen = torch.Generator().manual_seed(5)
    device = kernel_device()
    qkv = torch.randn(2, 5, 3, 2, 8, generator=gen).to(device).requires_grad_()
    emb = torch.randn(2, 5, 16, generator=gen).to(device).requires_grad_()
    cos, sin = WF.rotary_tables(5, WF.rotary_inv_freq(8).to(device))
    cos_e, sin_e = WF.rotary_tables(5, WF.rotary_inv_freq(16).to(device))

    def run():
        q, k = R.rotary_qk(qkv[:, :, 0], qkv[:, :, 1], cos, sin)
        x = R.embedding_rotation(emb, cos_e, sin_e, scale=4.0)
        loss = (q * q.flip(0)).sum() + k.sum() + (x * x.flip(1)).sum()
        return (q, k, x), torch.autograd.grad(loss, (qkv, emb))

    assert_registered_ops_compute_the_same(run, ("wmfast.rotary_qk", "wmfast.embedding_rotation"))


def test_compiles_with_no_graph_break_forward_and_backward(R):
    device = kernel_device()
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, 3, 2, 8, generator=gen).to(device).requires_grad_()
    emb = torch.randn(2, 5, 16, generator=gen).to(device).requires_grad_()
    cos_qk, sin_qk = WF.rotary_tables(5, WF.rotary_inv_freq(8).to(device))
    cos_e, sin_e = WF.rotary_tables(5, WF.rotary_inv_freq(16).to(device))

    def step(qkv, emb):
        q, k = R.rotary_qk(qkv[:, :, 0], qkv[:, :, 1], cos_qk, sin_qk)
        x = R.embedding_rotation(emb, cos_e, sin_e, scale=4.0)
        return (q * k).sum() + x.square().sum()

    explanation = torch._dynamo.explain(step)(qkv, emb)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(qkv, emb)
    grads = torch.autograd.grad(loss, (qkv, emb))
    eager_loss = step(qkv, emb)
    eager_grads = torch.autograd.grad(eager_loss, (qkv, emb))
    torch.testing.assert_close(loss, eager_loss, **FP32_LOGITS)
    for g, w in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, w, **FP32_GRADS)


def test_packed_in_place_compiles_with_no_graph_break_and_matches_eager(R):
    """On a view of a projection's output, under torch.compile(fullgraph=True).
    The fast path calls it only uncompiled for now; on CUDA this test is the
    check that compiled calls could use it too (triton_op mutating a view)."""
    device = kernel_device()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 8, generator=gen).to(device)
    weight = torch.randn(3 * 8, 8, generator=gen).to(device)
    cos, sin = WF.rotary_tables(5, WF.rotary_inv_freq(4).to(device))

    def attend_inputs(x):
        qkv = torch.nn.functional.linear(x, weight).view(2, 5, 3, 2, 4)
        R.rotary_qk_packed_(qkv, cos, sin)
        return qkv * 1.0

    with torch.no_grad():
        explanation = torch._dynamo.explain(attend_inputs)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(attend_inputs, fullgraph=True)(x)
        eager = attend_inputs(x)
    torch.testing.assert_close(compiled, eager, **FP32_LOGITS)
    q, k = WF.rotary_qk(
        *torch.nn.functional.linear(x, weight).view(2, 5, 3, 2, 4).unbind(2)[:2], cos, sin
    )
    torch.testing.assert_close(eager[:, :, 0], q, **FP32_LOGITS)
    torch.testing.assert_close(eager[:, :, 1], k, **FP32_LOGITS)


def test_packed_in_place_matches_and_refuses_autograd(R):
    device = kernel_device()
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 6, 3, 2, 12, generator=gen).to(device)
    cos, sin = WF.rotary_qk_tables(2, 6, WF.rotary_inv_freq(12).to(device))
    q_ref, k_ref = WF.rotary_qk(qkv[:, :, 0], qkv[:, :, 1], cos, sin)
    v = qkv[:, :, 2].clone()
    with torch.no_grad():
        R.rotary_qk_packed_(qkv, cos, sin)
    torch.testing.assert_close(qkv[:, :, 0], q_ref, **FP32_LOGITS)
    torch.testing.assert_close(qkv[:, :, 1], k_ref, **FP32_LOGITS)
    assert torch.equal(qkv[:, :, 2], v)
    with pytest.raises(RuntimeError, match="has no backward"):
        R.rotary_qk_packed_(qkv.clone().requires_grad_(), cos, sin)
    with pytest.raises(ValueError, match=r"\(batch, seq_len, 3, heads, head_dim\)"):
        R.rotary_qk_packed_(qkv[:, :, :2], cos, sin)


# -- rotary_qkv_packed: the packed projection's gradient in one pass ------------------


@given(
    batch=st.integers(1, 3),
    seq_len=st.sampled_from([1, 3, 7, 16]),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([2, 8, 48, 96]),
    table_grads=st.booleans(),
    broadcast=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_rotary_qkv_packed_matches_unbind_then_rotary_qk(
    R, batch, seq_len, heads, head_dim, table_grads, broadcast, seed
):
    """The same q, k and v as splitting the projection and rotating q and k,
    and the same gradients of the projection (and the tables), with v's
    gradient passed through."""
    gen = torch.Generator().manual_seed(seed)
    device = kernel_device()
    x = torch.randn(batch, seq_len, 3 * heads * head_dim, generator=gen).to(device)
    x.requires_grad_()
    inv_freq = WF.rotary_inv_freq(head_dim).to(device)
    if broadcast:
        cos, sin = WF.rotary_tables(seq_len, inv_freq)
    else:
        cos, sin = WF.rotary_qk_tables(batch, seq_len, inv_freq)
    cos, sin = cos.clone().requires_grad_(table_grads), sin.clone().requires_grad_(table_grads)
    weights = [torch.randn(batch, seq_len, heads, head_dim, generator=gen).to(device)] * 3
    weights = [w * (i + 1) for i, w in enumerate(weights)]
    inputs = (x, cos, sin) if table_grads else (x,)

    def run(split):
        qkv = (x * 1.5).view(batch, seq_len, 3, heads, head_dim)  # a non-leaf, as in the model
        outs = split(qkv)
        loss = sum((t * w).sum() for t, w in zip(outs, weights, strict=True))
        return outs, torch.autograd.grad(loss, inputs)

    got, got_grads = run(lambda qkv: R.rotary_qkv_packed(qkv, cos, sin))
    want, want_grads = run(
        lambda qkv: (*WF.rotary_qk(qkv[:, :, 0], qkv[:, :, 1], cos, sin), qkv[:, :, 2])
    )
    for name, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g, w, **FP32_LOGITS, msg=name)
    assert got[2]._base is not None  # v: a view of the projection, no copy
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **FP32_GRADS)


def test_rotary_qkv_packed_gradients_of_gradients(R):
    """A backward with create_graph records its rotation (the packed kernel
    records nothing), so a gradient penalty's gradients, tables' included,
    are those of the split-then-rotate reference."""
    gen = torch.Generator().manual_seed(8)
    device = kernel_device()
    x = torch.randn(2, 5, 3 * 2 * 8, generator=gen).to(device).requires_grad_()
    cos, sin = WF.rotary_qk_tables(2, 5, WF.rotary_inv_freq(8).to(device))
    cos, sin = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    w = torch.randn(2, 5, 2, 8, generator=gen).to(device)

    def penalty_grads(split):
        q, k, v = split((x * 1.5).view(2, 5, 3, 2, 8))
        loss = (q * k.flip(1) * w).sum() + (v * q).sum()
        grads = torch.autograd.grad(loss, (x, cos, sin), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), (x, cos, sin))

    got = penalty_grads(lambda qkv: R.rotary_qkv_packed(qkv, cos, sin))
    want = penalty_grads(
        lambda qkv: (*WF.rotary_qk(qkv[:, :, 0], qkv[:, :, 1], cos, sin), qkv[:, :, 2])
    )
    for g, w_ in zip(got, want, strict=True):
        assert w_.abs().max() > 0
        torch.testing.assert_close(g, w_, **FP32_GRADS)


def test_rotary_qkv_packed_registered_op_and_compile(R):
    """Under a tensor mode the packed gradient's registered op runs (the same
    numbers as the eager launch), and a function using it compiles with no
    graph break, forward and backward."""
    gen = torch.Generator().manual_seed(6)
    device = kernel_device()
    x = torch.randn(2, 5, 3 * 2 * 8, generator=gen).to(device).requires_grad_()
    cos, sin = WF.rotary_tables(5, WF.rotary_inv_freq(8).to(device))

    def step(x):
        q, k, v = R.rotary_qkv_packed((x * 2.0).view(2, 5, 3, 2, 8), cos, sin)
        return (q * k.flip(1)).sum() + (v * q).sum()

    def run():
        loss = step(x)
        return (loss,), torch.autograd.grad(loss, (x,))

    assert_registered_ops_compute_the_same(
        run, ("wmfast.rotary_qk", "wmfast.rotary_qk_packed_grad")
    )
    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True)(x)
    (grad,) = torch.autograd.grad(loss, (x,))
    (eager_loss,), (eager_grad,) = run()
    torch.testing.assert_close(loss, eager_loss, **FP32_LOGITS)
    torch.testing.assert_close(grad, eager_grad, **FP32_GRADS)


def test_rotary_qkv_packed_names_a_wrong_layout(R):
    cos, sin = WF.rotary_tables(4, WF.rotary_inv_freq(8))
    with pytest.raises(ValueError, match=r"\(batch, seq_len, 3, heads, head_dim\)"):
        R.rotary_qkv_packed(torch.randn(2, 4, 2, 2, 8, device=kernel_device()), cos, sin)
