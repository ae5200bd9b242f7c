"""Gradients of gradients (a backward with create_graph) through wmfast's
eager autograd Functions (wmfast.ops._create_graph): the helper's own
contract, and the fast CPU training step against the reference."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from wmfast.ops import mlp_eager, tail_eager
from wmfast.ops._create_graph import grads_with_graph

from ..helpers import (
    FP64_GRADS,
    POSITIONAL_TYPES,
    count_applies,
    random_ids,
    reference_and_fast,
    small_config,
)


def test_grads_with_graph_counts_only_the_compositions_own_uses():
    """When one input is computed from another (the last layer's q from its
    x), x's gradient holds only the composition's direct use of x: the path
    through q is the outer graph's to add, once."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    q = 2 * x
    grad = torch.randn(5, generator=gen, dtype=torch.float64)
    d_q, d_x = grads_with_graph(torch.mul, (q, x), (True, True), grad)
    torch.testing.assert_close(d_q, grad * x, rtol=0, atol=0)
    torch.testing.assert_close(d_x, grad * q, rtol=0, atol=0)
    # and they are functions of the inputs: d/dx of <d_x, 1> = 2 * grad
    (second,) = torch.autograd.grad(d_x.sum(), x)
    torch.testing.assert_close(second, 2 * grad, rtol=0, atol=0)
    assert grads_with_graph(torch.mul, (q, x), (False, True), grad)[0] is None


def _answer_weights(seed: int, batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    """A loss's weights on the logits at every 4th position (workingmem's
    answers), so that the tail's plain backward would take its row path."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(batch, seq_len, vocab, generator=gen, dtype=torch.float64)
    weights[:, [t for t in range(seq_len) if t % 4 != 2]] = 0
    return weights


def _penalty_grads(model, ids, weights) -> list[torch.Tensor]:
    """d/d params of a gradient penalty, sum of squares of d loss / d params.
    SDPA's math backend: its CPU flash kernel has no double backward, on the
    reference as on the fast model."""
    params = list(model.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        logits = model(ids)
        loss = (logits * weights.to(logits.dtype)).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        return torch.autograd.grad(penalty, params, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_fast_training_gradients_of_gradients_equal_the_reference(monkeypatch, pe, dropout):
    """Through the fast CPU training step's eager Functions (the tail, the
    in-place ReLU block, the reordered rotary projection: each recomputes
    its composition under create_graph), the same penalty gradients as the
    reference, for every parameter; with dropout, from the same seed (the
    CPU step draws the reference's masks)."""
    # fp64: second derivatives in fp32 carry more rounding than the spec's
    # gradient tolerance; the rotary projection, fp32 only, is
    # test_rotary_eager's. At test sizes, the tail with dropout and the block:
    monkeypatch.setattr(tail_eager, "MIN_WIDTH_WITH_DROPOUT", 0)
    monkeypatch.setattr(mlp_eager, "MIN_FUSED_HIDDEN", 0)
    config = small_config(positional_embedding_type=pe, dropout=dropout)
    reference, fast = reference_and_fast(config)
    reference.double().train()
    ids = random_ids(61, config.d_vocab, 2, 12)
    weights = _answer_weights(62, 2, 12, config.d_vocab)
    tail = tail_eager._TailAfterDroppedAttention if dropout else tail_eager._Tail
    applies = [count_applies(monkeypatch, f) for f in (tail, mlp_eager._ReluMLP)]

    torch.manual_seed(63)
    want = _penalty_grads(reference, ids, weights)
    torch.manual_seed(63)
    got = _penalty_grads(fast, ids, weights)

    # one tail; the block in every layer but the last (the tail's), where no
    # dropout sits between its two products
    assert applies == [[1], [0 if dropout else config.n_layers - 1]]
    for (name, _), g, w in zip(reference.named_parameters(), got, want, strict=True):
        if name != "output_layer.bias":  # no gradient depends on it: zero on both
            assert w.abs().max() > 0, name
        # (atol relative to the largest entry: some entries are zero in exact
        # arithmetic, e.g. the key bias's, and rounding noise in both)
        atol = FP64_GRADS["atol"] * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=FP64_GRADS["rtol"], atol=atol, msg=name)
