"""Pieces of the functional forward (wmfast.models.transformer_functional)
against the module compositions they stand for."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from wmfast.models.transformer_functional import bias_only_ffn

from ..helpers import AUTOCAST_LOGITS, FP32_GRADS


def _empty_ffn_weights(d_model: int, seed: int) -> list[torch.Tensor]:
    """linear1 (d -> 0) and linear2 (0 -> d) as the reference holds them at
    d_mlp 0, with a drawn bias that includes -0.0 and +0.0 entries."""
    gen = torch.Generator().manual_seed(seed)
    b2 = torch.randn(d_model, generator=gen)
    b2[torch.randperm(d_model, generator=gen)[: d_model // 3]] = -0.0
    b2[0] = 0.0
    tensors = [torch.empty(0, d_model), torch.empty(0), torch.empty(d_model, 0), b2]
    return [t.requires_grad_() for t in tensors]


def _composition(x, w1, b1, w2, b2):
    """nn.TransformerEncoderLayer's feed-forward block (dropout off)."""
    return F.linear(F.dropout(F.relu(F.linear(x, w1, b1)), 0.1, False), w2, b2)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 12)),
    seed=st.integers(0, 2**31 - 1),
)
def test_bias_only_ffn_is_the_d_mlp_0_block_bit_for_bit(autocast, shape, seed):
    batch, seq_len, d_model = shape
    x = torch.randn(batch, seq_len, d_model, generator=torch.Generator().manual_seed(seed + 1))
    x.requires_grad_()
    weights = _empty_ffn_weights(d_model, seed)
    grad = torch.randn(batch, seq_len, d_model, generator=torch.Generator().manual_seed(seed + 2))
    results = []
    for ffn in (_composition, bias_only_ffn):
        context = (
            torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        )
        with context:
            out = ffn(x, *weights)
        grads = torch.autograd.grad(out, weights, grad.to(out.dtype), allow_unused=True)
        results.append((out, grads))
    (want, want_grads), (got, got_grads) = results
    assert got.dtype == want.dtype and got.shape == want.shape
    # the same bits, the sign of zero included
    assert torch.equal(got.view(torch.int16 if autocast else torch.int32),
                       want.contiguous().view(torch.int16 if autocast else torch.int32))  # fmt: skip
    for name, g, w in zip(("w1", "b1", "w2", "b2"), got_grads, want_grads, strict=True):
        assert g is not None and w is not None, name  # the empty weights get empty gradients
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, **FP32_GRADS, msg=lambda m, n=name: f"{n}: {m}")
    # the bias's gradient is the sum over positions (checked on its own value:
    # the two sides agreeing could hide both being zero; a sum may be zero too,
    # as the "gpu" profile drew two bf16 gradients that cancel)
    by_hand = grad.to(got.dtype).sum((0, 1)).to(got_grads[3].dtype)
    torch.testing.assert_close(
        got_grads[3], by_hand, **(AUTOCAST_LOGITS if autocast else FP32_GRADS)
    )
