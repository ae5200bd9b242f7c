"""Runs of other workingmem revisions: they load as the functions they hold,
or fail naming the revision (wmfast.workingmem_revisions)."""

from __future__ import annotations

import pytest
import torch

from wmfast import CheckpointError, ModelWrapper, load_model, save_run
from wmfast.checkpoint import without_aliases

from .helpers import random_ids, reference_model, small_config


def _run_with_d_mlp_written_as_0(run_dir, d_mlp: int):
    """A run as the revision that builds d_mlp 0 as dim_feedforward 4 * d_model
    writes it: that width in the weights, ``d_mlp: 0`` in config.yaml.
    Returns the model whose weights it holds."""
    config = small_config(positional_embedding_type="rotary", d_mlp=d_mlp)
    model = reference_model(config).eval()
    save_run(run_dir, model, config)
    text = (run_dir / "config.yaml").read_text()
    assert f"d_mlp: {d_mlp}\n" in text
    (run_dir / "config.yaml").write_text(text.replace(f"d_mlp: {d_mlp}\n", "d_mlp: 0\n"))
    return model


def test_loads_the_d_mlp_0_runs_of_the_4x_revision(tmp_path, caplog):
    width = 4 * small_config().d_model
    written = _run_with_d_mlp_written_as_0(tmp_path, width)
    ids = random_ids(40, 50, 2, 9)
    with caplog.at_level("WARNING", logger="wmfast"):
        model = load_model(tmp_path, variant="reference").eval()
    assert "config.yaml says d_mlp 0" in caplog.text and f"d_mlp={width}" in caplog.text
    assert model.config.d_mlp == width
    with torch.no_grad():
        assert torch.equal(model(ids), written(ids))
    wrapper = ModelWrapper.from_checkpoint_dir(tmp_path, variant="reference")
    assert wrapper.config.d_mlp == width


def test_a_d_mlp_0_run_of_another_width_is_still_a_shape_error(tmp_path):
    _run_with_d_mlp_written_as_0(tmp_path, 2 * small_config().d_model)
    with pytest.raises(CheckpointError, match=r"linear1.weight: checkpoint \(64, 32\) vs model"):
        load_model(tmp_path, variant="reference")


def _sequential_keys(state_dict, model_class: str, numbered: bool):
    """wmfast's keys as the nn.Sequential RNN/LSTM named them."""
    names = ("0.", "1.", "2.") if numbered else ("embed.", f"{model_class}.", "unembed.")
    ours = ("embedding.", f"{model_class}_core.{model_class}.", "output_layer.")
    out = {}
    for key, value in without_aliases(state_dict).items():
        prefix = next(p for p in ours if key.startswith(p))
        out[names[ours.index(prefix)] + key[len(prefix) :]] = value
    return out


@pytest.mark.parametrize("model_class", ["rnn", "lstm"])
@pytest.mark.parametrize("numbered", [False, True], ids=["named", "numbered"])
def test_loads_the_runs_of_the_sequential_rnn_and_lstm(tmp_path, model_class, numbered):
    act_fn = "tanh" if model_class == "rnn" else "relu"
    config = small_config(model_class=model_class, act_fn=act_fn, seed=41)
    written = reference_model(config).eval()
    save_run(tmp_path, written, config)
    state = torch.load(tmp_path / "best_model.pth", weights_only=True)
    old = _sequential_keys(state, model_class, numbered)
    assert not any(key.startswith(f"{model_class}_core") for key in old)
    torch.save(old, tmp_path / "best_model.pth")
    model = load_model(tmp_path, variant="reference").eval()
    ids = random_ids(42, 50, 2, 7)
    with torch.no_grad():
        assert torch.equal(model(ids), written(ids))


def test_a_hooked_transformer_run_is_named_in_the_error(tmp_path):
    config = small_config()
    save_run(tmp_path, reference_model(config), config)
    gen, d = torch.Generator().manual_seed(43), config.d_model
    hooked = {
        "embed.W_E": torch.randn(50, d, generator=gen),
        "blocks.0.attn.W_Q": torch.randn(4, d, 8, generator=gen),
    }
    torch.save(hooked, tmp_path / "best_model.pth")
    with pytest.raises(CheckpointError, match="TransformerLens HookedTransformer"):
        load_model(tmp_path, variant="reference")


@pytest.mark.parametrize("model_class", ["rnn", "lstm"])
@pytest.mark.parametrize("numbered", [False, True], ids=["named", "numbered"])
def test_load_state_dict_takes_the_sequential_layout(model_class, numbered):
    config = small_config(model_class=model_class, seed=44)
    written = reference_model(config).eval()
    old = _sequential_keys(written.state_dict(), model_class, numbered)
    fresh = reference_model(config.replace(seed=45)).eval()
    fresh.load_state_dict(old, strict=True)
    ids = random_ids(46, 50, 2, 7)
    with torch.no_grad():
        assert torch.equal(fresh(ids), written(ids))
    # nested under a prefix, as in a user's own module holding the model
    holder = torch.nn.Module()
    holder.model = reference_model(config.replace(seed=47)).eval()
    holder.load_state_dict({f"model.{k}": v for k, v in old.items()}, strict=True)
    with torch.no_grad():
        assert torch.equal(holder.model(ids), written(ids))


def test_load_state_dict_of_the_sequential_layout_still_names_what_is_missing():
    config = small_config(model_class="lstm", seed=48)
    old = _sequential_keys(reference_model(config).state_dict(), "lstm", numbered=True)
    del old["2.bias"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*output_layer\.bias"):
        reference_model(config).load_state_dict(old, strict=True)
