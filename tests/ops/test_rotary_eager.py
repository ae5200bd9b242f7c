"""The eager fused RoPE (wmfast.ops.rotary_eager) against the pure-torch
reference: forward and gradients, on the layouts the fast path hands it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from wmfast import functional as WF
from wmfast.ops import rotary_eager

from ..helpers import DEVICES, FP32_GRADS, FP32_LOGITS


@pytest.mark.parametrize("device", DEVICES)
@given(
    batch=st.integers(1, 3),
    seq_len=st.sampled_from([1, 3, 7, 16]),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([2, 8, 48, 96]),
    tables=st.sampled_from(["shared", "per_batch", "broadcast_batch"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rotary_qk_matches_reference_forward_and_grads(
    device, batch, seq_len, heads, head_dim, tables, seed
):
    gen = torch.Generator().manual_seed(seed)
    # q and k as the fast path gets them: strided views into the packed projection
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen).to(device)
    qkv.requires_grad_()
    inv_freq = WF.rotary_inv_freq(head_dim).to(device)
    if tables == "shared":  # (T, D/2): what transformer_forward passes
        cos, sin = WF.rotary_tables(seq_len, inv_freq)
    elif tables == "per_batch":  # (B, T, D/2): pos_encoder's output
        cos, sin = WF.rotary_qk_tables(batch, seq_len, inv_freq)
    else:  # (B, T, D/2) with batch stride 0
        cos, sin = (t.expand(batch, -1, -1) for t in WF.rotary_tables(seq_len, inv_freq))
    w_q, w_k = (
        torch.randn(batch, seq_len, heads, head_dim, generator=gen).to(device) for _ in range(2)
    )

    def run(fn):
        q, k = fn(qkv[:, :, 0], qkv[:, :, 1], cos, sin)
        loss = (q * w_q).sum() + (k * w_k).sum()
        return (q, k), torch.autograd.grad(loss, qkv)[0]

    (q, k), grad = run(rotary_eager.rotary_qk)
    (q_ref, k_ref), grad_ref = run(WF.rotary_qk)
    torch.testing.assert_close(q, q_ref, **FP32_LOGITS)
    torch.testing.assert_close(k, k_ref, **FP32_LOGITS)
    torch.testing.assert_close(grad, grad_ref, **FP32_GRADS)
    assert grad.abs().sum() > 0


def test_rotary_qk_outputs_never_alias_inputs():
    q, k, _ = torch.randn(2, 5, 3, 2, 8).unbind(2)  # views into a packed projection
    cos, sin = WF.rotary_tables(5, WF.rotary_inv_freq(8))
    before = q.clone()
    q_out, k_out = rotary_eager.rotary_qk(q, k, cos, sin)
    assert q_out.data_ptr() != q.data_ptr() and k_out.data_ptr() != k.data_ptr()
    assert torch.equal(q, before)


def test_rotary_qk_table_gradients_match_reference():
    """Tables that need a gradient (an nnsight edit of pos_encoder) go through
    the reference math: their gradients must exist and be right."""
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 2, 6, 3, 16, generator=gen).unbind(0)
    cos, sin = WF.rotary_qk_tables(2, 6, WF.rotary_inv_freq(16))
    grads = []
    for fn in (rotary_eager.rotary_qk, WF.rotary_qk):
        c, s = cos.clone().requires_grad_(), sin.clone().requires_grad_()
        q_out, k_out = fn(q, k, c, s)
        grads.append(torch.autograd.grad((q_out * k_out).sum(), (c, s)))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, **FP32_GRADS)


def test_rotary_qk_bf16_equals_reference_bitwise():
    """bf16 storage takes the reference math (fp32 inside, one rounding)."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 2, 5, 2, 32, generator=gen).to(torch.bfloat16).unbind(0)
    cos, sin = WF.rotary_tables(5, WF.rotary_inv_freq(32))
    got_qk, want_qk = rotary_eager.rotary_qk(q, k, cos, sin), WF.rotary_qk(q, k, cos, sin)
    for got, want in zip(got_qk, want_qk, strict=True):
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want)
