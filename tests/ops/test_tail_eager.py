"""The last layer's tail with a row-sparse backward (wmfast.ops.tail_eager)
against the composition it replaces, and where the fast path uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from wmfast import build_model
from wmfast.attention_backends import sdpa_causal
from wmfast.fast import FastOptions
from wmfast.ops import tail_eager
from wmfast.tasks.sir import SIRConfig, SIRDataset
from wmfast.training import masked_loss, prepare_batch

from ..helpers import (
    FP32_GRADS,
    FP32_LOGITS,
    POSITIONAL_TYPES,
    count_applies,
    reference_and_fast,
    small_config,
)

EPS = 1e-5
FP64 = dict(rtol=1e-10, atol=1e-12)


def _composition(q, k, v, x, wo, bo, w1, b1, w2, b2, n1w, n1b, n2w, n2b, wu, bu, act_fn):
    """What the reference's modules compute from the last attention on."""
    act = F.gelu if act_fn == "gelu" else F.relu
    batch, seq_len, d_model = x.shape
    attn = sdpa_causal(q, k, v, 0.0).reshape(batch, seq_len, d_model)
    h = F.layer_norm(x + F.linear(attn, wo, bo), (d_model,), n1w, n1b, EPS)
    y = F.layer_norm(h + F.linear(act(F.linear(h, w1, b1)), w2, b2), (d_model,), n2w, n2b, EPS)
    return F.linear(y, wu, bu)


def _dropped_composition(a, x, wo, bo, w1, b1, w2, b2, n1w, n1b, n2w, n2b, wu, bu, act_fn, masks):
    """The reference's modules from the heads-merged attention output on, each
    dropout as its mask (B, T, width): ``x + dropout1(sa)`` and so on."""
    act = F.gelu if act_fn == "gelu" else F.relu
    m1, m_ffn, m2 = masks
    d_model = x.shape[-1]
    h = F.layer_norm(x + F.linear(a, wo, bo) * m1, (d_model,), n1w, n1b, EPS)
    ff = F.linear(act(F.linear(h, w1, b1)) * m_ffn, w2, b2) * m2
    return F.linear(F.layer_norm(h + ff, (d_model,), n2w, n2b, EPS), wu, bu)


def _tail(*tensors_and_act_fn):
    *tensors, act_fn = tensors_and_act_fn
    return tail_eager._Tail.apply(*tensors, EPS, act_fn == "gelu")


def _inputs(seed, batch, seq_len, heads, head_dim, d_mlp, vocab, dtype):
    """q, k, v (B, T, H, D), x (B, T, d), then the weights in LayerWeights' order."""
    gen = torch.Generator().manual_seed(seed)
    d, m = heads * head_dim, d_mlp
    qkv = [(batch, seq_len, heads, head_dim)] * 3
    shapes = qkv + [(batch, seq_len, d), (d, d), (d,), (m, d), (m,), (d, m), (d,),
                    (d,), (d,), (d,), (d,), (vocab, d), (vocab,)]  # fmt: skip
    tensors = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    for i in (10, 12):  # norm weights around 1, as trained ones are
        tensors[i] = 1 + 0.3 * tensors[i]
    return [t.to(dtype) for t in tensors]


def _row_weights(pattern, batch, seq_len, vocab, seed, dtype):
    """The loss's weights on the logits: every row ("all"), the answers'
    positions (every 4th, as workingmem's loss), every 4th from a position
    that differs between sequences ("ragged"), one row, or none."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(batch, seq_len, vocab, generator=gen, dtype=torch.float64)
    keep = torch.zeros(batch, seq_len, 1, dtype=torch.float64)
    if pattern == "all":
        keep[:] = 1
    elif pattern == "answers":
        keep[:, 2::4] = 1
    elif pattern == "ragged":
        for b in range(batch):
            keep[b, b % 4 :: 4] = 1
    elif pattern == "one":
        keep[batch - 1, seq_len // 2] = 1
    return (weight * keep).to(dtype)


def _run(fn, tensors, row_weights, act_fn):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves, act_fn)
    (out * row_weights).sum().backward()
    return out, [leaf.grad for leaf in leaves]


def _assert_same(tail, composition, tensors, row_weights, act_fn, dtype):
    """The same logits and gradients of every input, to fp64's or the spec's fp32 tolerances."""
    out, grads = _run(tail, tensors, row_weights, act_fn)
    want, want_grads = _run(composition, tensors, row_weights, act_fn)
    logits_tol, grads_tol = (FP64, FP64) if dtype == torch.float64 else (FP32_LOGITS, FP32_GRADS)
    torch.testing.assert_close(out, want, **logits_tol)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, **grads_tol)


@given(
    batch=st.integers(1, 3),
    seq_len=st.sampled_from([1, 4, 9, 16]),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([2, 8, 12]),
    d_mlp=st.sampled_from([0, 1, 8, 40]),
    vocab=st.sampled_from([3, 17]),
    act_fn=st.sampled_from(["relu", "gelu"]),
    pattern=st.sampled_from(["all", "answers", "ragged", "one", "none"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_tail_equals_the_composition(
    batch, seq_len, heads, head_dim, d_mlp, vocab, act_fn, pattern, dtype, seed
):
    tensors = _inputs(seed, batch, seq_len, heads, head_dim, d_mlp, vocab, dtype)
    row_weights = _row_weights(pattern, batch, seq_len, vocab, seed + 1, dtype)
    _assert_same(_tail, _composition, tensors, row_weights, act_fn, dtype)


def _masks(seed, batch, seq_len, widths, p, dtype):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(batch, seq_len, w, generator=gen, dtype=torch.float64) >= p).to(dtype) / (1 - p)
        for w in widths
    ]


@given(
    batch=st.integers(1, 3),
    seq_len=st.sampled_from([1, 4, 9, 16]),
    d_model=st.sampled_from([2, 8, 24]),
    d_mlp=st.sampled_from([0, 1, 8, 40]),
    vocab=st.sampled_from([3, 17]),
    act_fn=st.sampled_from(["relu", "gelu"]),
    pattern=st.sampled_from(["all", "answers", "ragged", "one", "none"]),
    p=st.sampled_from([0.1, 0.5]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_tail_after_dropped_attention_equals_the_composition(
    batch, seq_len, d_model, d_mlp, vocab, act_fn, pattern, p, dtype, seed
):
    """The training-with-dropout tail: given the attention's output and the
    layer's masks, the same logits and gradients (attention output, layer
    input, every weight) as the modules, whichever rows the loss reads."""
    # no q and k here: v's draw, (B, T, 1 head, d_model), serves as the attention output
    tensors = _inputs(seed, batch, seq_len, 1, d_model, d_mlp, vocab, dtype)[2:]
    tensors[0] = tensors[0].reshape(batch, seq_len, d_model)
    masks = _masks(seed + 2, batch, seq_len, (d_model, d_mlp, d_model), p, dtype)
    row_weights = _row_weights(pattern, batch, seq_len, vocab, seed + 1, dtype)
    flat_masks = [m.reshape(batch * seq_len, -1) for m in masks]

    def tail(*leaves_and_act_fn):
        *leaves, act_fn = leaves_and_act_fn
        apply = tail_eager._TailAfterDroppedAttention.apply
        return apply(*leaves, EPS, act_fn == "gelu", *flat_masks)

    def composition(*leaves_and_act_fn):
        return _dropped_composition(*leaves_and_act_fn, masks)

    _assert_same(tail, composition, tensors, row_weights, act_fn, dtype)


@pytest.mark.parametrize("time_major", [False, True])
def test_dropout_masks_are_what_f_dropout_draws_in_the_references_order(time_major):
    x = torch.randn(3, 5, 8)
    torch.manual_seed(4)
    m1, m_ffn, m2 = tail_eager.dropout_masks(x, 6, 0.3, time_major)
    state = torch.random.get_rng_state()
    torch.manual_seed(4)
    first = torch.ones(5, 3, 8) if time_major else torch.ones(3, 5, 8)
    want1 = F.dropout(first, 0.3, True)
    want1 = want1.transpose(0, 1) if time_major else want1
    want_ffn = F.dropout(torch.ones(3, 5, 6), 0.3, True)
    want2 = F.dropout(torch.ones(3, 5, 8), 0.3, True)
    for got, want in ((m1, want1), (m_ffn, want_ffn), (m2, want2)):
        assert torch.equal(got, want.reshape(15, -1))
    assert torch.equal(state, torch.random.get_rng_state())  # nothing more drawn
    torch.testing.assert_close(m1.unique(), torch.tensor([0.0, 1 / 0.7]))  # dropped, or kept scaled


def test_rows_to_compute_are_the_rows_the_loss_reads():
    grad = _row_weights("answers", 2, 8, 5, 0, torch.float32).reshape(16, 5)
    finite = (torch.ones(16, 3),)
    assert tail_eager.rows_to_compute(grad, finite).tolist() == [2, 6, 10, 14]
    grad[0, 4] = float("nan")  # a NaN is not zero: its row takes part
    assert tail_eager.rows_to_compute(grad, finite).tolist() == [0, 2, 6, 10, 14]
    grad[1, 0], grad[3, 1], grad[4, 2] = -float("inf"), 1e-42, -0.0  # a subnormal is not zero
    assert tail_eager.rows_to_compute(grad, finite).tolist() == [0, 1, 2, 3, 6, 10, 14]
    dense = _row_weights("all", 2, 8, 5, 0, torch.float32).reshape(16, 5)
    assert tail_eager.rows_to_compute(dense, finite) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_never_passes_a_nan_or_inf(dtype):
    x = torch.randn(64, 8).to(dtype)
    assert tail_eager._all_finite(x)
    for values in ([float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]):
        bad = x.clone()
        bad.view(-1)[: len(values)] = torch.tensor(values, dtype=dtype)
        assert not tail_eager._all_finite(bad)
    # fp16's largest values sum past fp16's range: the sum is taken in fp32
    assert tail_eager._all_finite(torch.full((64,), 60000.0, dtype=torch.float16))


def test_all_finite_may_refuse_finite_values_whose_sum_overflows():
    """The conservative side: the full backward, slower and still right."""
    assert not tail_eager._all_finite(torch.full((4,), 3e38))


def test_common_positions_only_when_every_sequence_has_them():
    rows = torch.tensor([2, 6, 10, 14])  # B 2, T 8: positions 2 and 6 in each
    assert tail_eager.common_positions(rows, 2, 8).tolist() == [2, 6]
    assert tail_eager.common_positions(torch.tensor([2, 6, 11, 14]), 2, 8) is None
    assert tail_eager.common_positions(torch.tensor([2, 6, 10]), 2, 8) is None
    assert tail_eager.common_positions(torch.tensor([], dtype=torch.long), 2, 8) is None


@pytest.mark.parametrize("where", ["activation", "weight"])
def test_non_finite_values_take_the_full_backward(where):
    """0 * inf is NaN: where the composition's gradients turn NaN through rows
    the loss does not read, the tail's must too."""
    tensors = _inputs(7, 2, 8, 2, 4, 16, 5, torch.float32)
    if where == "activation":
        tensors[3][0, 0, 3] = float("inf")  # x at a position the loss does not read
    else:
        tensors[14][1, 2] = float("inf")  # output_layer.weight
    row_weights = _row_weights("answers", 2, 8, 5, 1, torch.float32)
    _, grads = _run(_tail, tensors, row_weights, "relu")
    _, want_grads = _run(_composition, tensors, row_weights, "relu")
    assert any(g.isnan().any() for g in want_grads)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, **FP32_GRADS, equal_nan=True)


def _sir_batch(batch_size, trials):
    data = SIRDataset(SIRConfig(seq_len=trials, n_sequences=batch_size, seed=3))
    raw = next(iter(torch.utils.data.DataLoader(data, batch_size=batch_size)))
    return prepare_batch(raw, 350, mask_answer_tokens=True)


@pytest.mark.parametrize("act_fn", ["relu", "gelu"])
@pytest.mark.parametrize("positional", ["rotary_qk", "standard"])
def test_fast_training_gradients_on_the_answer_loss_equal_the_reference(
    monkeypatch, act_fn, positional
):
    """workingmem's loss (the answers only) through a fast model, tail included."""
    calls = count_applies(monkeypatch, tail_eager._Tail)
    config = small_config(positional_embedding_type=positional, act_fn=act_fn, d_vocab=350)
    reference, fast = reference_and_fast(config)
    batch = _sir_batch(4, 8)
    grads = []
    for model in (reference, fast):
        model.train()
        model.zero_grad()
        loss, _ = masked_loss(model(batch.input_ids), batch)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert calls[0] == 1
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, **FP32_GRADS, msg=name)


def _weights_after_answer_loss_training() -> list[torch.Tensor]:
    config = small_config(positional_embedding_type="rotary_qk", d_vocab=350)
    _, fast = reference_and_fast(config)
    optimizer = torch.optim.AdamW(fast.parameters(), lr=1e-3)
    batch = _sir_batch(4, 8)
    for _ in range(3):
        loss, _ = masked_loss(fast.train()(batch.input_ids), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in fast.parameters()]


def test_cpu_training_reruns_through_it_are_bitwise_reproducible(monkeypatch):
    """The README's claim for CPU training, with the tail and its sparse rows."""
    calls = count_applies(monkeypatch, tail_eager._Tail)
    first, second = _weights_after_answer_loss_training(), _weights_after_answer_loss_training()
    assert calls[0] == 6
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "changes, train, grad, min_width, used",
    [
        (dict(), True, True, 256, "tail"),
        (dict(dropout=0.1), False, True, 256, "tail"),  # eval: dropout is the identity
        (dict(dropout=0.1), True, True, 48, "dropped"),  # d_mlp 48 reaches the width
        (dict(dropout=0.1), True, True, 49, None),  # neither d_model 32 nor d_mlp 48 does
        (dict(), True, False, 256, None),  # no backward to save
        (dict(d_model=16, n_heads=2), True, True, 256, None),  # below MIN_D_MODEL
    ],
)
def test_fast_transformer_uses_it_where_it_saves_work(
    monkeypatch, changes, train, grad, min_width, used
):
    calls = {
        "tail": count_applies(monkeypatch, tail_eager._Tail),
        "dropped": count_applies(monkeypatch, tail_eager._TailAfterDroppedAttention),
    }
    monkeypatch.setattr(tail_eager, "MIN_D_MODEL", 32)
    monkeypatch.setattr(tail_eager, "MIN_WIDTH_WITH_DROPOUT", min_width)
    config = small_config(positional_embedding_type="rotary_qk", **changes)
    model = build_model(config, fast_options=FastOptions(compile="never")).train(train)
    with torch.set_grad_enabled(grad):
        model(torch.randint(0, config.d_vocab, (2, 9)))
    assert {name: count[0] for name, count in calls.items()} == {
        name: int(name == used) for name in calls
    }


@pytest.mark.parametrize(
    "pe, d_mlp", [(pe, 48) for pe in POSITIONAL_TYPES] + [("rotary_qk", 0), (None, 0)]
)
@pytest.mark.parametrize("loss", ["answers", "all"])
def test_cpu_training_with_dropout_through_it_draws_the_references_masks(
    monkeypatch, pe, d_mlp, loss
):
    """As tests/test_fast.py's mask-for-mask test, with the tail in the last
    layer (nn.MultiheadAttention's dropout1 draws in (T, B, d) order): the
    same logits, gradients and random state afterwards as the reference."""
    calls = count_applies(monkeypatch, tail_eager._TailAfterDroppedAttention)
    monkeypatch.setattr(tail_eager, "MIN_TOKENS", 16)
    monkeypatch.setattr(tail_eager, "MIN_WIDTH_WITH_DROPOUT", 32)
    config = small_config(positional_embedding_type=pe, dropout=0.3, d_mlp=d_mlp, d_vocab=350)
    reference, fast = reference_and_fast(config)
    batch = _sir_batch(3, 6)

    def train_step(model):
        torch.manual_seed(17)
        logits = model.train()(batch.input_ids)
        value = masked_loss(logits, batch)[0] if loss == "answers" else logits.square().mean()
        grads = torch.autograd.grad(value, list(model.parameters()))
        return logits, grads, torch.random.get_rng_state()

    (ref_logits, ref_grads, ref_state), (logits, grads, state) = map(train_step, (reference, fast))
    assert calls[0] == 1
    torch.testing.assert_close(logits, ref_logits, **FP32_LOGITS)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **FP32_GRADS)
    assert torch.equal(state, ref_state)
    with torch.no_grad():
        assert (logits - reference.eval()(batch.input_ids)).abs().max() > 1e-2  # dropout was active


@pytest.mark.parametrize("min_tokens, used", [(18, True), (19, False)])
def test_calls_from_min_tokens_up_take_it(monkeypatch, min_tokens, used):
    calls = count_applies(monkeypatch, tail_eager._Tail)
    monkeypatch.setattr(tail_eager, "MIN_TOKENS", min_tokens)
    config = small_config()
    model = build_model(config, fast_options=FastOptions(compile="never"))
    model(torch.randint(0, config.d_vocab, (2, 9)))  # 18 tokens
    assert calls[0] == int(used)


def test_autocast_takes_the_composition(monkeypatch):
    calls = count_applies(monkeypatch, tail_eager._Tail)
    model = build_model(small_config(), fast_options=FastOptions(compile="never"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 50, (2, 9))).float().sum().backward()
    assert calls[0] == 0
