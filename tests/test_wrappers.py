"""The drop-in wrappers: construction, device choice, checkpoints."""

from __future__ import annotations

import types

import pytest
import torch

from wmfast import (
    ConfigError,
    LSTMModelWrapper,
    ModelConfig,
    ModelWrapper,
    RNNModelWrapper,
    TransformerModelWrapper,
)

from .helpers import GOLDEN, random_ids, small_config


@pytest.mark.parametrize(
    "wrapper_cls, cls",
    [
        (TransformerModelWrapper, "transformer"),
        (RNNModelWrapper, "rnn"),
        (LSTMModelWrapper, "lstm"),
    ],
)
def test_wrapper_holds_model_config_and_device(wrapper_cls, cls):
    config = small_config(model_class=cls, act_fn="tanh" if cls == "rnn" else "relu")
    wrapper = wrapper_cls(config)
    assert wrapper.config is config and wrapper.history == []
    assert wrapper.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert next(wrapper.model.parameters()).device.type == wrapper.device.type
    assert wrapper.model(random_ids(0, 50, 2, 4).to(wrapper.device)).shape == (2, 4, 50)


def test_wrapper_refuses_a_config_for_another_model_class():
    with pytest.raises(ConfigError, match="RNNModelWrapper builds model_class='rnn'"):
        RNNModelWrapper(small_config(model_class="transformer"))


def test_base_wrapper_builds_what_the_config_names():
    assert type(ModelWrapper(small_config(model_class="lstm")).model).__name__ == "LSTMModel"


def test_wrappers_default_to_the_fast_variant(tmp_path):
    wrapper = TransformerModelWrapper(small_config())
    assert wrapper.variant == "fast" and wrapper.model.variant == "fast"
    wrapper.save_checkpoint(tmp_path)
    assert TransformerModelWrapper.from_checkpoint_dir(tmp_path).model.variant == "fast"
    reference = TransformerModelWrapper.from_checkpoint_dir(tmp_path, variant="reference")
    assert reference.model.variant == "reference"


def test_save_and_load_checkpoint(tmp_path):
    wrapper = TransformerModelWrapper(small_config(positional_embedding_type="rotary"))
    wrapper.history = [{"epoch": 1}]
    wrapper.save_checkpoint(tmp_path)
    wrapper.save_checkpoint(tmp_path, epoch_num=1)
    assert (tmp_path / "checkpoints" / "epoch_1.pth").is_file()

    other = TransformerModelWrapper(small_config(positional_embedding_type="rotary", seed=3))
    other.load_checkpoint(tmp_path)
    assert torch.equal(other.model.embedding.weight.cpu(), wrapper.model.embedding.weight.cpu())
    assert other.history == [{"epoch": 1}]
    assert other.config.from_pretrained == str(tmp_path)

    again = TransformerModelWrapper.from_checkpoint_dir(tmp_path, epoch=1)
    assert torch.equal(again.model.output_layer.bias.cpu(), wrapper.model.output_layer.bias.cpu())


def test_from_pretrained_builds_from_the_stored_config(tmp_path, caplog):
    TransformerModelWrapper(small_config(n_layers=3)).save_checkpoint(tmp_path)
    with caplog.at_level("WARNING", logger="wmfast"):
        wrapper = TransformerModelWrapper(small_config(n_layers=1, from_pretrained=str(tmp_path)))
    assert len(wrapper.model.transformer_encoder.layers) == 3
    assert "ignored" in caplog.text


def test_loading_a_run_of_another_model_class_is_refused(tmp_path):
    LSTMModelWrapper(small_config(model_class="lstm")).save_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="TransformerModelWrapper builds"):
        TransformerModelWrapper.from_checkpoint_dir(tmp_path)


def test_evaluate_and_test_report_workingmems_metrics():
    from wmfast.tasks.sir import SIRDataset

    wrapper = TransformerModelWrapper(small_config(d_vocab=350))
    data = SIRDataset(seq_len=10, n_sequences=6)  # answers beyond the 4-answer warm-up
    metrics = wrapper.evaluate(data)
    assert set(metrics) == {"loss", "acc", "macro_acc"} and metrics["loss"] > 0
    assert 0 <= metrics["acc"] <= 1
    assert wrapper.test(data) == metrics


def test_load_state_dict_takes_a_workingmem_state_dict_strictly():
    golden = torch.load(GOLDEN / "transformer_standard_gelu_dmlp64.pt", weights_only=True)
    wrapper = TransformerModelWrapper(ModelConfig.from_dict(golden["config"]).replace(seed=3))
    wrapper.load_state_dict(golden["state_dict"], wrapper.config)
    assert torch.equal(wrapper.model.embedding.weight.cpu(), golden["state_dict"]["embed.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):
        wrapper.load_state_dict({"embed.weight": golden["state_dict"]["embed.weight"]})


class _Table:
    """What evaluate asks of a wandb.Table."""

    def __init__(self):
        self.rows = []

    def add_data(self, *row):
        self.rows.append(row)


def test_evaluate_takes_workingmems_arguments_and_returns_its_predictions():
    from wmfast.tasks.sir import SIRDataset

    # (the reference variant: what is tested is the wrapper's, and it compiles nothing)
    wrapper = TransformerModelWrapper(small_config(d_vocab=350, seed=5), variant="reference")
    data = SIRDataset(seq_len=10, n_sequences=6, seed=5)
    out = wrapper.evaluate(data, batch_size=4, return_predictions=True, precision="fp32")
    ids = torch.stack([data[i]["token_ids"] for i in range(len(data))])
    locations = data[0]["answer_locations"]
    positions = locations.nonzero().squeeze(1)
    with torch.no_grad():  # answers masked to 0; each answer read from the position before
        logits = wrapper.model(ids.mul(1 - locations).to(wrapper.device)).cpu()
    assert (out["predictions"] == logits[:, positions - 1].argmax(-1).numpy()).all()
    assert (out["actual_labels"] == ids[:, positions].numpy()).all()
    assert out["input_sequences"] == ids.tolist()
    metrics = wrapper.evaluate(data, batch_size=4, precision="fp32")
    assert metrics == {k: out[k] for k in ("loss", "acc", "macro_acc")}

    table = _Table()
    assert wrapper.evaluate(data, 3, table, batch_size=4, precision="fp32") == metrics
    assert [row[:2] for row in table.rows] == [(3, 0), (3, 1), (3, 2), (3, 3), (3, 0), (3, 1)]
    assert table.rows[5][2:] == (
        ids[5].tolist(), out["predictions"][5].tolist(), out["actual_labels"][5].tolist()
    )  # fmt: skip
    data.tokenizer = types.SimpleNamespace(decode=lambda ids: " ".join(map(str, ids)))
    table = _Table()
    wrapper.evaluate(data, 0, table, batch_size=4, precision="fp32")
    assert table.rows[1][3] == " ".join(map(str, out["predictions"][1].tolist()))
    table = _Table()
    wrapper.test(data, table)  # as workingmem's test: no epoch, so no rows
    assert table.rows == []


def test_evaluate_counts_the_warmup_answers_when_asked():
    from wmfast.tasks import sir

    wrapper = TransformerModelWrapper(small_config(d_vocab=350, seed=6), variant="reference")
    with torch.no_grad():  # a model that always answers "same"
        wrapper.model.output_layer.weight.zero_()
        wrapper.model.output_layer.bias.zero_()[sir.SAME] = 1.0
    data = sir.SIRDataset(seq_len=10, n_sequences=6, seed=6)
    labels = torch.stack([data[i]["token_ids"][3::4] for i in range(len(data))])
    right = labels == sir.SAME
    skipped = wrapper.evaluate(data, batch_size=4, precision="fp32")
    every = wrapper.evaluate(data, batch_size=4, precision="fp32", skip_warmup=False)
    warmup = 2 * data.config.concurrent_reg
    assert skipped["acc"] == pytest.approx(float(right[:, warmup:].float().mean()))
    assert every["acc"] == pytest.approx(float(right.float().mean()))
    assert every["acc"] != skipped["acc"]
