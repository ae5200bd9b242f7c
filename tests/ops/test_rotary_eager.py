"""The in-projection with RoPE in eager kernels (wmfast.ops.rotary_eager)
against the reference: F.linear, then the pure-torch rotary_qk. Forward values
(in the reference's feature order), attention scores, and the gradients of x,
the weight and the bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from wmfast import functional as WF
from wmfast.ops import rotary_eager

from ..helpers import DEVICES, FP32_GRADS, FP32_LOGITS, count_applies


def reference_qkv(x, weight, bias, heads, cos, sin):
    batch, seq_len, d_model = x.shape
    q, k, v = F.linear(x, weight, bias).view(batch, seq_len, 3, heads, -1).unbind(2)
    q, k = WF.rotary_qk(q, k, cos, sin)
    return q, k, v


def reference_order(t: torch.Tensor) -> torch.Tensor:
    """Undo the interleaving of each head's features: (..., D) -> (..., D)."""
    return torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)


def draw_inputs(seed, batch, seq_len, heads, head_dim, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    d_model = heads * head_dim
    x = torch.randn(batch, seq_len, d_model, generator=gen)
    weight = torch.randn(3 * d_model, d_model, generator=gen) / d_model**0.5
    bias = torch.randn(3 * d_model, generator=gen)
    tensors = [t.to(device, dtype).requires_grad_() for t in (x, weight, bias)]
    cos, sin = WF.rotary_tables(seq_len, WF.rotary_inv_freq(head_dim).to(device))
    return tensors, cos, sin, gen


@pytest.mark.parametrize("device", DEVICES)
@given(
    batch=st.integers(1, 3),
    seq_len=st.sampled_from([1, 3, 7, 16]),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([2, 8, 48, 96]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rotated_qkv_matches_reference_forward_and_grads(
    device, batch, seq_len, heads, head_dim, seed
):
    (x, weight, bias), cos, sin, gen = draw_inputs(seed, batch, seq_len, heads, head_dim, device)
    # a loss that weighs q and k through the scores (blind to their shared
    # feature order) and v per feature
    w_scores = torch.randn(batch, heads, seq_len, seq_len, generator=gen).to(device)
    w_v = torch.randn(batch, seq_len, heads, head_dim, generator=gen).to(device)

    def run(fn):
        q, k, v = fn(x, weight, bias, heads, cos, sin)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
        loss = (scores * w_scores).sum() + (v * w_v).sum()
        return (q, k, v, scores), torch.autograd.grad(loss, (x, weight, bias))

    (q, k, v, scores), grads = run(rotary_eager.rotated_qkv)
    (q_ref, k_ref, v_ref, scores_ref), grads_ref = run(reference_qkv)
    torch.testing.assert_close(reference_order(q), q_ref, **FP32_LOGITS)
    torch.testing.assert_close(reference_order(k), k_ref, **FP32_LOGITS)
    torch.testing.assert_close(v, v_ref, **FP32_LOGITS)
    # the interleaved order sums each score's head_dim products in another
    # order: the rounding scales with the largest score (tens), not with 1
    scale = max(1.0, scores_ref.abs().max().item())
    torch.testing.assert_close(
        scores, scores_ref, rtol=FP32_LOGITS["rtol"], atol=FP32_LOGITS["atol"] * scale
    )
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, **FP32_GRADS)
        assert want.abs().sum() > 0


def test_interleaved_rows_pair_each_head_and_keep_v():
    rows = rotary_eager.interleaved_rows(12, 2, torch.device("cpu")).tolist()  # head dim 6
    assert rows[:6] == [0, 3, 1, 4, 2, 5]  # q, head 0: pairs (j, j + 3) side by side
    assert rows[6:12] == [6, 9, 7, 10, 8, 11]  # q, head 1
    assert rows[12:18] == [12, 15, 13, 16, 14, 17]  # k, head 0
    assert rows[24:] == list(range(24, 36))  # v as it is
    assert sorted(rows) == list(range(36))


def test_rotated_qkv_leaves_its_inputs_unchanged():
    (x, weight, bias), cos, sin, _ = draw_inputs(5, 2, 5, 2, 8, "cpu")
    before = [t.detach().clone() for t in (x, weight, bias)]
    q, k, v = rotary_eager.rotated_qkv(x, weight, bias, 2, cos, sin)
    (q.sum() + k.sum() + v.sum()).backward()
    for t, old in zip((x, weight, bias), before, strict=True):
        assert torch.equal(t.detach(), old)


def test_rotated_qkv_table_gradients_take_the_reference():
    """Tables that need a gradient take the reference math, in the reference order."""
    (x, weight, bias), cos, sin, _ = draw_inputs(7, 2, 6, 3, 16, "cpu")
    grads = []
    for fn in (rotary_eager.rotated_qkv, reference_qkv):
        c, s = cos.clone().requires_grad_(), sin.clone().requires_grad_()
        q, k, _ = fn(x, weight, bias, 3, c, s)
        grads.append(torch.autograd.grad((q * k).sum(), (c, s)))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, **FP32_GRADS)


def test_rotated_qkv_gradients_of_gradients_match_reference(monkeypatch):
    """A backward with create_graph rotates the gradient with recorded ops, so
    a gradient penalty's gradients are the reference's."""
    (x, weight, bias), cos, sin, gen = draw_inputs(19, 2, 6, 2, 16, "cpu")
    w_scores, w_v = torch.randn(2, 2, 6, 6, generator=gen), torch.randn(2, 6, 2, 16, generator=gen)
    rotations = count_applies(monkeypatch, rotary_eager._RotateInterleavedQK)

    def penalty_grads(fn):
        q, k, v = fn(x, weight, bias, 2, cos, sin)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k)  # blind to q's and k's shared order
        loss = (scores * w_scores).sum() + (v * w_v).sum()
        grads = torch.autograd.grad(loss, (x, weight, bias), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), (x, weight, bias))

    got = penalty_grads(rotary_eager.rotated_qkv)
    assert rotations == [1]
    want = penalty_grads(reference_qkv)
    for g, w in zip(got, want, strict=True):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, **FP32_GRADS)


def test_rotated_qkv_bf16_equals_reference_bitwise():
    """bf16 storage takes the reference math (fp32 inside, one rounding)."""
    (x, weight, bias), cos, sin, _ = draw_inputs(3, 2, 5, 2, 32, "cpu", torch.bfloat16)
    got = rotary_eager.rotated_qkv(x, weight, bias, 2, cos, sin)
    want = reference_qkv(x, weight, bias, 2, cos, sin)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        assert torch.equal(g, w)


def test_rotated_qkv_without_bias_matches_reference():
    (x, weight, _), cos, sin, _ = draw_inputs(11, 2, 7, 2, 16, "cpu")
    got = rotary_eager.rotated_qkv(x, weight, None, 2, cos, sin)
    want = reference_qkv(x, weight, None, 2, cos, sin)
    torch.testing.assert_close(reference_order(got[0]), want[0], **FP32_LOGITS)
    torch.testing.assert_close(reference_order(got[1]), want[1], **FP32_LOGITS)
    torch.testing.assert_close(got[2], want[2], **FP32_LOGITS)


def test_torch_func_transforms_take_the_reference_math():
    """The in-place Function has no functorch rules: under torch.func.grad the
    projection runs the reference math (in the reference order)."""
    (x, weight, bias), cos, sin, _ = draw_inputs(13, 2, 6, 2, 8, "cpu")

    def loss(fn, w):
        q, k, v = fn(x.detach(), w, bias.detach(), 2, cos, sin)
        return (q * k).sum() + v.square().sum()

    got = torch.func.grad(lambda w: loss(rotary_eager.rotated_qkv, w))(weight.detach())
    want = torch.func.grad(lambda w: loss(reference_qkv, w))(weight.detach())
    assert torch.equal(got, want)


@pytest.mark.parametrize("batch, seq_len, fused", [(2, 63, False), (2, 64, True), (4, 64, True)])
def test_projections_from_min_fused_tokens_up_take_the_reordered_rows(
    monkeypatch, batch, seq_len, fused
):
    """Below MIN_FUSED_TOKENS (batch * length) the projection is the reference
    math in the reference order; from it up, the interleaved order."""
    monkeypatch.setattr(rotary_eager, "MIN_FUSED_TOKENS", 128)
    (x, weight, bias), cos, sin, _ = draw_inputs(17, batch, seq_len, 2, 8, "cpu")
    q, k, v = rotary_eager.rotated_qkv(x, weight, bias, 2, cos, sin)
    q_ref, k_ref, v_ref = reference_qkv(x, weight, bias, 2, cos, sin)
    order = reference_order if fused else (lambda t: t)
    torch.testing.assert_close(order(q), q_ref, **FP32_LOGITS)
    torch.testing.assert_close(order(k), k_ref, **FP32_LOGITS)
    assert torch.equal(v, v_ref) or not fused
    assert not torch.allclose(q, q_ref) if fused else torch.equal(q, q_ref)
