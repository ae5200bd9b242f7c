"""ReLU kinks (wmfast.relu_kinks): finding the ReLU inputs near zero, taking
one on its other side, and why the flips' effects on the gradients add."""

from __future__ import annotations

import pytest
import torch

from wmfast import build_model, relu_kinks

from .helpers import put_relu_inputs_at_zero, random_ids, small_config

LAYER0 = "transformer_encoder.layers.0.linear1"


def _relu_inputs(model, ids) -> dict[str, torch.Tensor]:
    seen = {}

    def record(path):
        def hook(module, args, out):  # returns None: the output stays as it is
            seen.setdefault(path, out.detach())

        return hook

    handles = [
        linear.register_forward_hook(record(path))
        for path, linear in relu_kinks.relu_inputs(model).items()
    ]
    model(ids)
    for handle in handles:
        handle.remove()
    return seen


def _grads(model, ids, weight) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    grads = torch.autograd.grad((model(ids) * weight).sum(), list(named.values()))
    return dict(zip(named, grads, strict=True))


@pytest.fixture
def model_and_ids():
    model = build_model(small_config(seed=3), variant="reference").train()
    return model, random_ids(7, 50, 2, 12)


def test_the_relu_inputs_are_linear1_of_relu_layers_with_a_hidden_layer():
    assert list(relu_kinks.relu_inputs(build_model(small_config(), variant="reference"))) == [
        LAYER0,
        "transformer_encoder.layers.1.linear1",
    ]
    for changes in (dict(act_fn="gelu"), dict(d_mlp=0), dict(model_class="lstm")):
        model = build_model(small_config(**changes), variant="reference")
        assert relu_kinks.relu_inputs(model) == {}, changes


def test_near_kinks_are_the_inputs_nearest_zero_within_the_margin(model_and_ids):
    model, ids = model_and_ids
    inputs = _relu_inputs(build_model(small_config(seed=3), variant="reference").train(), ids)
    sizes = torch.cat([v.abs().flatten() for v in inputs.values()]).sort().values
    # a margin that takes in exactly the 5 nearest (no layer's largest is below 1)
    margin = float(sizes[4] + sizes[5]) / 2 / max(float(v.abs().max()) for v in inputs.values())
    assert all(float(v.abs().max()) > 1 for v in inputs.values())
    kinks, total = relu_kinks.near_kinks(model, lambda: model(ids), margin, limit=3)
    scales = {path: float(v.abs().max()) for path, v in inputs.items()}
    want_total = sum(int((v.abs() <= margin * scales[p]).sum()) for p, v in inputs.items())
    assert total == want_total >= 3
    assert [abs(k.value) for k in kinks] == sorted(abs(k.value) for k in kinks)
    assert abs(kinks[0].value) == float(sizes[0])
    for kink in kinks:
        assert kink.value == float(inputs[kink.path][kink.index])


def test_a_flipped_relu_input_changes_sign_and_nothing_else(model_and_ids):
    model, ids = model_and_ids
    before = _relu_inputs(model, ids)[LAYER0]
    on = tuple(int(i) for i in torch.nonzero(before > 0)[0])
    off = tuple(int(i) for i in torch.nonzero(before < 0)[0])
    kinks = [
        relu_kinks.Kink(LAYER0, on, float(before[on])),
        relu_kinks.Kink(LAYER0, off, float(before[off])),
    ]
    with relu_kinks.flipped(model, kinks):
        after = _relu_inputs(model, ids)[LAYER0]
    assert after[on] == -before[on] and after[off] == -before[off]
    unchanged = torch.ones_like(before, dtype=torch.bool)
    unchanged[on] = unchanged[off] = False
    assert torch.equal(after[unchanged], before[unchanged])
    assert not relu_kinks.relu_inputs(model)[LAYER0]._forward_hooks  # removed afterwards


def test_a_flip_at_a_kink_moves_its_own_units_gradient_and_flips_add(model_and_ids):
    """The premise of likely_flips: taking a ReLU input at zero on its other
    side changes linear1's bias gradient in that unit only, leaves the
    gradients above the ReLU as they were, and two flips change the gradients
    by the sum of each one's change."""
    model, ids = model_and_ids
    picks = [(0, 3, 5), (1, 9, 17)]
    put_relu_inputs_at_zero(model, ids, picks)
    kinks, _ = relu_kinks.near_kinks(model, lambda: model(ids), 1e-5)
    assert {k.index for k in kinks if k.path == LAYER0} >= set(picks)
    a, b = (next(k for k in kinks if k.index == p) for p in picks)
    weight = torch.randn(2, 12, 50, generator=torch.Generator().manual_seed(1))
    base = _grads(model, ids, weight)

    def with_flips(*flips):
        with relu_kinks.flipped(model, flips):
            return _grads(model, ids, weight)

    only_a, only_b, both = with_flips(a), with_flips(b), with_flips(a, b)
    bias = f"{LAYER0}.bias"
    moved = (only_a[bias] - base[bias]).abs() > 1e-6
    assert moved.sum() == 1 and moved[a.index[-1]]
    tight = dict(rtol=1e-5, atol=1e-6)
    for above in ("output_layer.weight", "transformer_encoder.layers.1.linear2.weight"):
        torch.testing.assert_close(only_a[above], base[above], **tight)
    for name in base:
        added = only_a[name] + only_b[name] - base[name]
        torch.testing.assert_close(both[name], added, **tight, msg=name)


def test_near_kinks_records_without_changing_the_forward(model_and_ids):
    """The recording hooks leave every output as it is, graph included: a
    forward with a backward inside near_kinks gives the gradients it gives
    without them."""
    model, ids = model_and_ids
    weight = torch.randn(2, 12, 50, generator=torch.Generator().manual_seed(2))
    want = _grads(model, ids, weight)
    got = {}
    relu_kinks.near_kinks(model, lambda: got.update(_grads(model, ids, weight)), 1e-5)
    for name, g in want.items():
        assert torch.equal(got[name], g), name
