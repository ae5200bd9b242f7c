"""Run directories in workingmem's layout: round trips both ways, every error, atomic writes."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import yaml

from wmfast import CheckpointError, ModelConfig, load_model, save_run
from wmfast import checkpoint as ckpt
from wmfast.config import WMFAST_MODEL_FIELDS

from .helpers import (
    FP32_LOGITS,
    GOLDEN,
    POSITIONAL_TYPES,
    random_ids,
    reference_model,
    small_config,
)

ALL_CONFIGS = [small_config(positional_embedding_type=pe) for pe in POSITIONAL_TYPES] + [
    small_config(model_class="rnn", act_fn="tanh"),
    small_config(model_class="lstm"),
]


@dataclasses.dataclass
class WorkingmemModelConfig:
    """workingmem's own ModelConfig: its fields only, so unknown keys fail as there."""

    model_class: str = "transformer"
    from_pretrained: object = None
    n_layers: int = 2
    d_model: int = 512
    init_weights: bool = True
    seed: object = None
    act_fn: str = "relu"
    attn_only: bool = True
    n_heads: int = 4
    n_ctx: int = 1205
    d_head: int = 128
    d_mlp: int = 0
    d_vocab: object = None
    positional_embedding_type: object = None
    d_hidden: int = 256


def _as_workingmem_module(model: torch.nn.Module) -> torch.nn.Module:
    """What workingmem's model looks like to load_state_dict: embed/unembed aliases."""
    model.embed = model.embedding
    model.unembed = model.output_layer
    return model


@pytest.mark.parametrize(
    "config", ALL_CONFIGS, ids=lambda c: f"{c.model_class}-{c.positional_embedding_type}"
)
def test_round_trip_wmfast_to_wmfast(tmp_path, config):
    model = reference_model(config)
    weights = save_run(tmp_path, model, config, history=[{"epoch": 1}])
    assert weights == tmp_path / "best_model.pth"
    loaded = load_model(tmp_path, variant="reference")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids = random_ids(0, 50, 2, 9)
    torch.testing.assert_close(loaded.eval()(ids), model.eval()(ids), rtol=0, atol=0)
    assert loaded.config.replace(from_pretrained=None) == config
    assert loaded.config.from_pretrained == str(tmp_path)


@pytest.mark.parametrize(
    "config", ALL_CONFIGS, ids=lambda c: f"{c.model_class}-{c.positional_embedding_type}"
)
def test_saved_run_is_loadable_by_workingmem(tmp_path, config):
    model = reference_model(config)
    save_run(tmp_path, model, config)
    # config.yaml: workingmem's fields only, plain YAML, read as ModelConfig(**yaml)
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    WorkingmemModelConfig(**data)
    assert not set(WMFAST_MODEL_FIELDS) & set(data)
    assert yaml.safe_load((tmp_path / "wmfast.yaml").read_text()) == {"dropout": config.dropout}
    assert yaml.safe_load((tmp_path / "history.yaml").read_text()) == []
    # best_model.pth: strict load into a model that carries workingmem's aliases
    state = torch.load(tmp_path / "best_model.pth", weights_only=True)
    assert list(state)[-3:] == ["embed.weight", "unembed.weight", "unembed.bias"]
    theirs = _as_workingmem_module(reference_model(config.replace(seed=99)))
    theirs.load_state_dict(state, strict=True)
    assert torch.equal(theirs.output_layer.weight, model.output_layer.weight)


@pytest.mark.parametrize("name", ["transformer_rotary_relu_dmlp96.pt", "lstm.pt"])
@pytest.mark.parametrize("with_aliases", [True, False])
@pytest.mark.parametrize("with_history", [True, False])
def test_loads_a_workingmem_run(tmp_path, name, with_aliases, with_history):
    golden = torch.load(GOLDEN / name, weights_only=True)
    state = golden["state_dict"] if with_aliases else ckpt.without_aliases(golden["state_dict"])
    torch.save(state, tmp_path / "best_model.pth")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(golden["config"]))
    if with_history:
        (tmp_path / "history.yaml").write_text(yaml.safe_dump([{"epoch": 3}]))
    model = load_model(tmp_path, variant="reference").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(golden["input_ids"]), golden["logits"], **FP32_LOGITS)
    assert ckpt.read_run(tmp_path).history == ([{"epoch": 3}] if with_history else [])
    assert model.config.dropout == 0.1  # no wmfast.yaml: wmfast's defaults


def test_reads_the_pathlib_tag_workingmem_writes(tmp_path):
    config = small_config()
    save_run(tmp_path, reference_model(config), config)
    text = (
        (tmp_path / "config.yaml")
        .read_text()
        .replace(
            "from_pretrained: null",
            "from_pretrained: !!python/object/apply:pathlib.PosixPath\n- /\n- runs\n- abc",
        )
    )
    (tmp_path / "config.yaml").write_text(text)
    assert ckpt.read_config(tmp_path).from_pretrained == "/runs/abc"


def test_other_python_tags_are_refused(tmp_path):
    config = small_config()
    save_run(tmp_path, reference_model(config), config)
    (tmp_path / "config.yaml").write_text("d_vocab: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        load_model(tmp_path, variant="reference")


def test_epoch_checkpoints(tmp_path):
    config = small_config()
    first = reference_model(config)
    save_run(tmp_path, first, config)
    second = reference_model(config.replace(seed=1))
    path = save_run(tmp_path, second, config, epoch=4)
    assert path == tmp_path / "checkpoints" / "epoch_4.pth"
    assert torch.equal(
        load_model(tmp_path, epoch=4, variant="reference").embedding.weight, second.embedding.weight
    )
    assert torch.equal(
        load_model(tmp_path, variant="reference").embedding.weight, first.embedding.weight
    )
    with pytest.raises(CheckpointError, match="no checkpoint for epoch 5"):
        load_model(tmp_path, epoch=5, variant="reference")


@pytest.fixture
def run_dir(tmp_path):
    config = small_config(positional_embedding_type="standard")
    save_run(tmp_path / "run", reference_model(config), config)
    return tmp_path / "run"


def test_error_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_model(tmp_path / "nope", variant="reference")


def test_error_no_pth(run_dir):
    (run_dir / "best_model.pth").unlink()
    with pytest.raises(CheckpointError, match="exactly one top-level .pth file .* found 0"):
        load_model(run_dir, variant="reference")


def test_error_two_pth(run_dir):
    shutil.copy(run_dir / "best_model.pth", run_dir / "other.pth")
    with pytest.raises(CheckpointError, match="found 2: \\['best_model.pth', 'other.pth'\\]"):
        load_model(run_dir, variant="reference")


def test_error_missing_config(run_dir):
    (run_dir / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="config.yaml not found"):
        load_model(run_dir, variant="reference")


@pytest.mark.parametrize(
    "text, message",
    [
        ("d_model: [unclosed", "not valid YAML"),
        ("- a list\n", "must hold a mapping"),
        ("d_vocab: 50\nnum_lstm_cells: 3\n", "num_lstm_cells"),
        ("d_vocab: 50\nn_layers: 0\n", "n_layers"),
    ],
)
def test_error_invalid_config(run_dir, text, message):
    (run_dir / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_model(run_dir, variant="reference")


def test_error_truncated_pth(run_dir):
    data = (run_dir / "best_model.pth").read_bytes()
    (run_dir / "best_model.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a PyTorch checkpoint"):
        load_model(run_dir, variant="reference")


def test_error_not_a_checkpoint(run_dir):
    (run_dir / "best_model.pth").write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a PyTorch checkpoint"):
        load_model(run_dir, variant="reference")


def test_error_pickled_code_is_refused(run_dir):
    torch.save({"weights": torch.zeros(1), "hook": print}, run_dir / "best_model.pth")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(run_dir, variant="reference")


def test_error_not_a_state_dict(run_dir):
    torch.save([torch.zeros(1)], run_dir / "best_model.pth")
    with pytest.raises(CheckpointError, match="does not hold a model state_dict"):
        load_model(run_dir, variant="reference")


def test_error_names_missing_and_unexpected_keys(run_dir):
    state = torch.load(run_dir / "best_model.pth", weights_only=True)
    state.pop("transformer_encoder.layers.1.norm2.bias")
    state["transformer_encoder.layers.2.norm2.bias"] = torch.zeros(32)
    torch.save(state, run_dir / "best_model.pth")
    with pytest.raises(CheckpointError) as info:
        load_model(run_dir, variant="reference")
    message = str(info.value)
    assert "missing keys ['transformer_encoder.layers.1.norm2.bias']" in message
    assert "unexpected keys ['transformer_encoder.layers.2.norm2.bias']" in message


def test_error_names_shape_mismatches(run_dir):
    state = torch.load(run_dir / "best_model.pth", weights_only=True)
    state["output_layer.bias"] = torch.zeros(51)
    state["unembed.bias"] = state["output_layer.bias"]
    torch.save(state, run_dir / "best_model.pth")
    with pytest.raises(
        CheckpointError, match=r"output_layer.bias: checkpoint \(51,\) vs model \(50,\)"
    ):
        load_model(run_dir, variant="reference")


def test_error_alias_disagreement(run_dir):
    state = torch.load(run_dir / "best_model.pth", weights_only=True)
    state["unembed.bias"] = state["unembed.bias"] + 1
    torch.save(state, run_dir / "best_model.pth")
    with pytest.raises(CheckpointError, match="alias key 'unembed.bias' disagrees"):
        load_model(run_dir, variant="reference")


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_interrupted_save_keeps_the_old_checkpoint(run_dir, monkeypatch, exc):
    before = (run_dir / "best_model.pth").read_bytes()

    def half_written_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise exc()

    monkeypatch.setattr(ckpt.torch, "save", half_written_save)
    config = small_config(positional_embedding_type="standard", seed=5)
    with pytest.raises(exc):
        save_run(run_dir, reference_model(config), config)
    assert (run_dir / "best_model.pth").read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "best_model.pth",
        "config.yaml",
        "history.yaml",
        "wmfast.yaml",
    ]
    monkeypatch.undo()
    load_model(run_dir, variant="reference")  # still loads


def test_history_entries_are_written_as_plain_yaml(tmp_path):
    @dataclasses.dataclass
    class Entry:
        epoch: int
        checkpoint_dir: object

    config = small_config()
    save_run(tmp_path, reference_model(config), config, history=[Entry(2, tmp_path)])
    assert yaml.safe_load((tmp_path / "history.yaml").read_text()) == [
        {"epoch": 2, "checkpoint_dir": str(tmp_path)}
    ]


def test_from_pretrained_is_stored_as_a_string(tmp_path):
    config = small_config(from_pretrained=tmp_path / "elsewhere")
    save_run(tmp_path / "run", reference_model(small_config()), config)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["from_pretrained"] == str(
        tmp_path / "elsewhere"
    )


def test_build_model_with_from_pretrained_loads_and_ignores_other_fields(run_dir, caplog):
    stored = ckpt.read_config(run_dir)
    with caplog.at_level("WARNING", logger="wmfast"):
        model = reference_model(ModelConfig(from_pretrained=run_dir, d_vocab=7, n_layers=5))
    assert "ignored" in caplog.text
    assert model.config.n_layers == stored.n_layers and model.config.d_vocab == stored.d_vocab
