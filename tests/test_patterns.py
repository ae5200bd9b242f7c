"""Attention patterns (wmfast.patterns) against what the reference's own
modules compute: nn.MultiheadAttention's weights (need_weights=True) at each
layer's input, and, for "rotary_qk", softmax of the rotated q and k its
``self_attn.rotary`` returns."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from wmfast import attention_pattern, attention_patterns, build_model

from .helpers import (
    DEVICES,
    FP32_LOGITS,
    POSITIONAL_TYPES,
    random_ids,
    reference_and_fast,
    reference_model,
    small_config,
)


def patterns_from_modules(model, ids):
    """Each layer's pattern as the reference's modules give it, from the
    activations forward hooks capture in one forward."""
    inputs, rotated = [], []
    handles = []
    for layer in model.transformer_encoder.layers:
        handles.append(layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0])))
        if hasattr(layer.self_attn, "rotary"):
            handles.append(
                layer.self_attn.rotary.register_forward_hook(lambda m, a, out: rotated.append(out))
            )
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    if rotated:
        return [attention_pattern(q, k) for q, k in rotated]
    seq_len = ids.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    with torch.no_grad():
        return [
            layer.self_attn(
                x, x, x, attn_mask=causal, need_weights=True, average_attn_weights=False
            )[1]
            for layer, x in zip(model.transformer_encoder.layers, inputs, strict=True)
        ]


@given(
    pe=st.sampled_from(POSITIONAL_TYPES),
    heads=st.sampled_from([1, 2, 4]),
    layers=st.integers(1, 3),
    seq_len=st.sampled_from([1, 5, 17]),
    seed=st.integers(0, 2**31 - 1),
)
def test_patterns_equal_the_reference_modules(pe, heads, layers, seq_len, seed):
    config = small_config(
        positional_embedding_type=pe, n_heads=heads, d_model=8 * heads, n_layers=layers, seed=seed
    )
    model = reference_model(config).eval()
    ids = random_ids(seed, config.d_vocab, 3, seq_len)
    got = attention_patterns(model, ids)
    want = patterns_from_modules(model, ids)
    assert len(got) == layers
    for g, w in zip(got, want, strict=True):
        assert g.shape == (3, heads, seq_len, seq_len) and g.dtype == torch.float32
        torch.testing.assert_close(g, w, **FP32_LOGITS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
def test_fast_models_give_the_reference_patterns(pe, device):
    config = small_config(positional_embedding_type=pe, seed=3)
    reference, fast = reference_and_fast(config, device)
    ids = random_ids(4, config.d_vocab, 2, 12).to(device)
    for g, w in zip(attention_patterns(fast, ids), attention_patterns(reference, ids), strict=True):
        assert torch.equal(g, w)


def test_patterns_are_causal_distributions_without_dropout_in_any_mode():
    config = small_config(positional_embedding_type="rotary_qk", dropout=0.5, seed=5)
    model = build_model(config).train()
    ids = random_ids(6, config.d_vocab, 2, 9)
    first = attention_patterns(model, ids)
    again = attention_patterns(model.eval(), ids)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)  # train mode changed nothing: no dropout
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 9))
        past = torch.ones(9, 9, dtype=torch.bool).tril()
        assert torch.all(a[..., ~past] == 0) and torch.all(a[..., past] > 0)
    model.train()
    attention_patterns(model, ids)
    assert model.training  # the model's mode is left as it was


def test_patterns_of_a_bf16_model_are_fp32_and_differentiable():
    model = reference_model(small_config(positional_embedding_type="rotary")).to(torch.bfloat16)
    (pattern, _) = attention_patterns(model, random_ids(7, 50, 2, 6))
    assert pattern.dtype == torch.float32
    weights = torch.randn(pattern.shape, generator=torch.Generator().manual_seed(8))
    (pattern * weights).sum().backward()
    grad = model.transformer_encoder.layers[0].self_attn.in_proj_weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_bad_input_gets_clear_errors():
    rnn = reference_model(small_config(model_class="rnn", act_fn="tanh"))
    with pytest.raises(TypeError, match="RNN/LSTM models have no attention"):
        attention_patterns(rnn, random_ids(0, 50, 1, 4))
    model = reference_model(small_config())
    with pytest.raises(ValueError, match="out of range"):
        attention_patterns(model, torch.full((1, 4), 50))
    with pytest.raises(ValueError, match=r"q and k must both be \(batch, seq_len"):
        attention_pattern(torch.randn(1, 4, 2, 8), torch.randn(1, 5, 2, 8))
    # a tree changed after building: the patterns would come from other math
    model.transformer_encoder.layers[0].activation = torch.nn.Tanh()
    with pytest.raises(ValueError, match=r"layers\.0\.activation is Tanh\(\), not relu"):
        attention_patterns(model, random_ids(1, 50, 1, 4))


@pytest.mark.nnsight
def test_a_traced_rotary_output_gives_the_pattern_with_its_edits():
    """The pattern of q and k saved in an nnsight trace at self_attn.rotary,
    and how an edit of pos_encoder's tables there changes it."""
    from wmfast.interp import NNsight

    config = small_config(positional_embedding_type="rotary_qk", seed=9)
    fast = build_model(config)
    ids = random_ids(10, config.d_vocab, 2, 8)
    traced = NNsight(fast)
    with traced.trace() as tracer:
        with tracer.invoke(ids):
            clean = traced.transformer_encoder.layers[1].self_attn.rotary.output.save()
        with tracer.invoke(ids):
            traced.pos_encoder.output[0][:] = 1.0  # cos = 1, sin = 0: no rotation
            traced.pos_encoder.output[1][:] = 0.0
            unrotated = traced.transformer_encoder.layers[1].self_attn.rotary.output.save()
    with torch.no_grad():
        want = attention_patterns(fast, ids)[1]
    torch.testing.assert_close(attention_pattern(*clean), want, **FP32_LOGITS)
    assert not torch.allclose(attention_pattern(*unrotated), want, atol=1e-3)
