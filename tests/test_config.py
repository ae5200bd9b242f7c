"""ModelConfig / TrainingConfig: workingmem's fields and defaults, validation, round trips."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from wmfast import ConfigError, ModelConfig, TrainingConfig

# workingmem's ModelConfig, field by field, in its order (SPEC.md section 1)
WORKINGMEM_DEFAULTS = {
    "model_class": "transformer",
    "from_pretrained": None,
    "n_layers": 2,
    "d_model": 512,
    "init_weights": True,
    "seed": None,
    "act_fn": "relu",
    "attn_only": True,
    "n_heads": 4,
    "n_ctx": 1205,
    "d_head": 128,
    "d_mlp": 0,
    "d_vocab": None,
    "positional_embedding_type": None,
    "d_hidden": 256,
}


def test_model_config_has_workingmem_fields_in_order_with_defaults():
    cfg = ModelConfig()
    assert cfg.workingmem_dict() == WORKINGMEM_DEFAULTS
    assert list(cfg.workingmem_dict()) == list(WORKINGMEM_DEFAULTS)
    assert cfg.wmfast_dict() == {"dropout": 0.1}


def test_training_config_defaults_match_workingmem():
    assert TrainingConfig().to_dict() == {
        "epochs": 60,
        "optimizer": "adamw",
        "learning_rate": 4e-4,
        "weight_decay": 0.0,
        "sparsity": 0.0,
        "checkpoint_dir": "model_checkpoints/",
        "batch_size": 128,
        "seed": None,
        "logging_strategy": "epoch",
        "logging_steps": 1,
        "log_predictions": None,
        "logging_steps_per_epoch": 5,
        "save_strategy": "best",
        "save_steps": None,
        "do_test": True,
        "mask_answer_tokens": True,
        "freeze_embeddings": None,
        "precision": "auto",  # wmfast's own field
    }


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(model_class="gru"), "model_class"),
        (dict(n_layers=0), "n_layers"),
        (dict(n_layers=2.0), "n_layers"),
        (dict(d_model=0), "d_model"),
        (dict(d_model=30, n_heads=4), "n_heads"),
        (dict(act_fn="tanh"), "act_fn"),  # not a transformer FFN activation
        (dict(model_class="rnn", act_fn="gelu"), "act_fn"),  # not an nn.RNN nonlinearity
        (dict(model_class="lstm", act_fn="swish"), "act_fn"),
        (dict(n_heads=0), "n_heads"),
        (dict(n_ctx=0), "n_ctx"),
        (dict(d_mlp=-1), "d_mlp"),
        (dict(d_vocab=0), "d_vocab"),
        (dict(positional_embedding_type="learned"), "positional_embedding_type"),
        (dict(positional_embedding_type="None"), "positional_embedding_type"),
        (dict(positional_embedding_type="rotary", d_model=15, n_heads=3), "d_model"),
        (dict(positional_embedding_type="rotary_qk", d_model=36, n_heads=4), "head dim"),
        (dict(d_hidden=0), "d_hidden"),
        (dict(seed="forty-two"), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(init_weights="yes"), "init_weights"),
        (dict(from_pretrained=3), "from_pretrained"),
    ],
)
def test_bad_model_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**changes)


def test_error_lists_the_allowed_values():
    with pytest.raises(ConfigError) as info:
        ModelConfig(positional_embedding_type="learned")
    assert "'standard'" in str(info.value) and "'rotary_qk'" in str(info.value)


def test_transformer_only_checks_do_not_apply_to_recurrent_models():
    # n_heads is unused by RNN/LSTM: an indivisible d_model is fine there
    assert ModelConfig(model_class="rnn", d_model=30, n_heads=4, act_fn="tanh").d_model == 30


def test_numeric_string_seed_is_accepted():
    assert ModelConfig(seed="56").seed_int == 56


def test_validate_catches_edits_after_construction():
    cfg = ModelConfig(d_vocab=10)
    cfg.n_layers = 0
    with pytest.raises(ConfigError, match="n_layers"):
        cfg.validate()


def test_require_vocab_is_a_clear_error():
    with pytest.raises(ConfigError, match="d_vocab"):
        ModelConfig().require_vocab()


def test_from_dict_names_unknown_keys():
    with pytest.raises(ConfigError, match="num_lstm_cells"):
        ModelConfig.from_dict({"d_vocab": 10, "num_lstm_cells": 3})


valid_configs = st.builds(
    lambda cls, pe, n_layers, heads, head_half, d_mlp, vocab, seed, dropout, hidden: ModelConfig(
        model_class=cls,
        positional_embedding_type=pe if cls == "transformer" else None,
        n_layers=n_layers,
        n_heads=heads,
        d_model=heads * head_half * 2,
        d_mlp=d_mlp,
        d_vocab=vocab,
        seed=seed,
        dropout=dropout,
        d_hidden=hidden,
        act_fn="tanh" if cls == "rnn" else "gelu" if cls == "transformer" else "relu",
        from_pretrained=None,
    ),
    st.sampled_from(["transformer", "rnn", "lstm"]),
    st.sampled_from(["standard", "rotary", None, "rotary_qk"]),
    st.integers(1, 6),
    st.integers(1, 8),
    st.integers(1, 40),
    st.integers(0, 512),
    st.none() | st.integers(1, 10_000),
    st.none() | st.integers(0, 2**31) | st.integers(0, 99).map(str),
    st.floats(0.0, 0.99),
    st.integers(1, 512),
)


@given(valid_configs)
def test_dict_and_yaml_round_trip(cfg: ModelConfig):
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    text = yaml.safe_dump(cfg.to_dict())
    assert ModelConfig.from_dict(yaml.safe_load(text)) == cfg
    # config.yaml + wmfast.yaml split and rejoined
    rejoined = {**cfg.workingmem_dict(), **cfg.wmfast_dict()}
    assert ModelConfig.from_dict(rejoined) == cfg


def test_paths_become_strings_in_dicts(tmp_path):
    cfg = ModelConfig(from_pretrained=tmp_path)
    assert cfg.to_dict()["from_pretrained"] == str(tmp_path)
    yaml.safe_dump(cfg.to_dict())  # no python tags needed


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(epochs=-1), "epochs"),
        (dict(optimizer="sgd"), "optimizer"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(batch_size=0), "batch_size"),
        (dict(save_strategy="steps"), "save_strategy"),
        (dict(seed="x"), "seed"),
    ],
)
def test_bad_training_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        TrainingConfig(**changes)


def test_training_config_round_trip():
    cfg = TrainingConfig(epochs=3, seed="7", batch_size=32)
    assert TrainingConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="interleaved"):
        TrainingConfig.from_dict({**dataclasses.asdict(cfg), "interleaved": True})
