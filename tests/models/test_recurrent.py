"""The reference RNN and LSTM: paths, keys, and that the cores are plain cuDNN-able
nn.RNN / nn.LSTM returning only the output sequence."""

from __future__ import annotations

import pytest
import torch

from ..helpers import random_ids, reference_model, small_config


@pytest.mark.parametrize(
    "cls, core, inner", [("rnn", "rnn_core", "rnn"), ("lstm", "lstm_core", "lstm")]
)
def test_paths_and_keys(cls, core, inner):
    model = reference_model(
        small_config(model_class=cls, act_fn="tanh" if cls == "rnn" else "relu")
    )
    paths = dict(model.named_modules())
    assert {"embedding", core, f"{core}.{inner}", "output_layer"} <= set(paths)
    keys = list(model.state_dict())
    assert keys[0] == "embedding.weight" and keys[-2:] == [
        "output_layer.weight",
        "output_layer.bias",
    ]
    assert all(k.startswith(f"{core}.{inner}.") for k in keys[1:-2])
    assert len(keys[1:-2]) == 4 * 2  # weight_ih, weight_hh, bias_ih, bias_hh per layer


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_rnn_matches_a_step_by_step_recurrence(act):
    model = reference_model(small_config(model_class="rnn", act_fn=act, n_layers=1))
    ids = random_ids(0, 50, 2, 7)
    rnn = model.rnn_core.rnn
    x = model.embedding(ids)  # no sqrt scaling for recurrent models
    h = torch.zeros(2, 24)  # zero initial state
    nonlinearity = torch.relu if act == "relu" else torch.tanh
    outputs = []
    for t in range(7):
        h = nonlinearity(
            x[:, t] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h @ rnn.weight_hh_l0.T + rnn.bias_hh_l0
        )
        outputs.append(h)
    expected = model.output_layer(torch.stack(outputs, dim=1))
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", ["rnn", "lstm"])
def test_core_returns_only_the_output_sequence(cls):
    model = reference_model(
        small_config(model_class=cls, act_fn="tanh" if cls == "rnn" else "relu")
    )
    core = model.rnn_core if cls == "rnn" else model.lstm_core
    out = core(torch.randn(3, 5, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (3, 5, 24)


@pytest.mark.parametrize("cls", ["rnn", "lstm"])
def test_recurrent_models_are_causal(cls):
    model = reference_model(
        small_config(model_class=cls, act_fn="tanh" if cls == "rnn" else "relu")
    )
    ids = random_ids(1, 50, 2, 9)
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 3) % 50
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4], b[:, 4])


def test_recurrent_models_have_no_position_limit():
    model = reference_model(small_config(model_class="lstm", n_ctx=4))
    assert model(random_ids(2, 50, 1, 9)).shape == (1, 9, 50)
