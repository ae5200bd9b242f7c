"""Zero-ablating attention heads (wmfast.heads): the ablated model computes
what the same model with the head's output set to zero computes, on both
variants, compiled, traced, and the weights come back afterwards."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from wmfast import build_model
from wmfast.heads import ablate_heads

from .helpers import (
    DEVICES,
    FP32_GRADS,
    FP32_LOGITS,
    POSITIONAL_TYPES,
    random_ids,
    reference_and_fast,
    small_config,
)


def _values_zeroed(model, layer: int, head: int):
    """A copy of ``model`` whose head ``head`` of layer ``layer`` reads zero
    values: its output z_h = pattern @ v_h is then zero, the ablation computed
    another way. Returns the copy and the rows of in_proj holding those values."""
    copied = copy.deepcopy(model)
    attention = copied.transformer_encoder.layers[layer].self_attn
    d_model, head_dim = attention.embed_dim, attention.embed_dim // attention.num_heads
    rows = slice(2 * d_model + head * head_dim, 2 * d_model + (head + 1) * head_dim)
    with torch.no_grad():
        attention.in_proj_weight[rows] = 0
        attention.in_proj_bias[rows] = 0
    return copied, rows


def _logits_and_grads(model, params, ids, train):
    model.train(train)
    logits = model(ids)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    return logits, torch.autograd.grad((logits * weight).sum(), params)


@pytest.mark.parametrize("variant", ["reference", "fast"])
@pytest.mark.parametrize("pe", POSITIONAL_TYPES)
@given(
    layer=st.integers(0, 1),
    head=st.integers(0, 3),
    train=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_an_ablated_head_adds_nothing_to_its_layer(pe, variant, layer, head, train, seed):
    """Logits as with the head's values zeroed; gradients too, except that the
    ablation passes none to the head's values (nor to the zeroed columns)."""
    config = small_config(positional_embedding_type=pe, seed=seed)
    reference, fast = reference_and_fast(config)
    model = fast if variant == "fast" else reference
    ids = random_ids(seed, 50, 2, 7)
    zeroed, value_rows = _values_zeroed(reference, layer, head)
    want, want_grads = _logits_and_grads(zeroed, list(zeroed.parameters()), ids, train)
    clean = model(ids)
    with ablate_heads(model, [(layer, head)]):
        got, got_grads = _logits_and_grads(model, list(reference.parameters()), ids, train)
    torch.testing.assert_close(got, want, **FP32_LOGITS)
    assert (got - clean).abs().max() > 1e-4  # the head mattered
    prefix = f"transformer_encoder.layers.{layer}.self_attn."
    names = [name for name, _ in reference.named_parameters()]
    for name, g_got, g_want in zip(names, got_grads, want_grads, strict=True):
        if name in (prefix + "in_proj_weight", prefix + "in_proj_bias"):
            assert not g_got[value_rows].any(), name
            g_want = g_want.clone()
            g_want[value_rows] = 0
        if name == prefix + "out_proj.weight":
            columns = g_got.view(g_got.shape[0], config.n_heads, -1)[:, head]
            assert not columns.any(), "the zeroed columns' own gradient"
        torch.testing.assert_close(g_got, g_want, **FP32_GRADS, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(model(ids), clean, rtol=0, atol=0)  # the weights came back


@pytest.mark.parametrize("device", DEVICES)
def test_the_compiled_no_grad_path_sees_the_ablation(device):
    config = small_config(positional_embedding_type="rotary_qk")
    reference, fast = reference_and_fast(config, device)
    reference.eval(), fast.eval()
    ids = random_ids(9, 50, 2, 9).to(device)  # test_fast's compiled shape: its graph, if it ran
    with torch.no_grad():
        clean = fast(ids)
        with ablate_heads(fast, [(1, 2), (0, 0), (1, 3)]):
            ablated = fast(ids)
            assert fast._fast.last_plan.compiled
            torch.testing.assert_close(ablated, reference(ids), **FP32_LOGITS)
        assert (ablated - clean).abs().max() > 1e-4
        assert torch.equal(fast(ids), clean)


def test_weights_come_back_after_an_error_and_through_nested_ablations():
    model = build_model(small_config(), variant="reference")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with ablate_heads(model, [(0, 1)]):
            with ablate_heads(model, [(0, 1), (0, 2)]):
                raise RuntimeError("inside")
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    weight = model.transformer_encoder.layers[0].self_attn.out_proj.weight
    assert not weight._backward_hooks  # the gradient hooks are gone too


@pytest.mark.parametrize(
    "heads, error, match",
    [
        ([(2, 0)], ValueError, r"layer must be an int in \[0, 2\)"),
        ([(0, 4)], ValueError, r"head must be an int in \[0, n_heads=4\)"),
        ([(0, -1)], ValueError, "head must be"),
        ([0], TypeError, r"\(layer, head\) pairs"),
    ],
)
def test_bad_heads_get_clear_errors_before_any_edit(heads, error, match):
    model = build_model(small_config(), variant="reference")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        with ablate_heads(model, [(1, 1), *heads]):
            pass
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_recurrent_models_have_no_heads():
    with pytest.raises(TypeError, match="no attention heads"):
        with ablate_heads(build_model(small_config(model_class="lstm")), [(0, 0)]):
            pass


@pytest.mark.nnsight
def test_a_traced_fast_model_takes_the_ablation_as_the_reference():
    from wmfast.interp import NNsight

    reference, fast = reference_and_fast(small_config(positional_embedding_type="standard"))
    ids = random_ids(12, 50, 2, 6)
    saved = {}
    for name, model in (("reference", reference), ("fast", fast)):
        traced = NNsight(model)
        with ablate_heads(traced, [(0, 3)]):
            with traced.trace(ids):
                attention = traced.transformer_encoder.layers[0].self_attn.output[0].save()
                logits = traced.output.save()
        saved[name] = attention, logits
    for got, want in zip(saved["fast"], saved["reference"], strict=True):
        torch.testing.assert_close(got, want, **FP32_LOGITS)
    with ablate_heads(reference, [(0, 3)]):
        torch.testing.assert_close(saved["fast"][1], reference(ids), **FP32_LOGITS)
