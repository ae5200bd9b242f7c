"""build_model: variants, seeding, clear errors."""

from __future__ import annotations

import pytest
import torch

from wmfast import ConfigError, ModelConfig, build_model

from .helpers import small_config


def test_same_seed_same_weights_and_string_seeds_equal_int_seeds():
    a = build_model(small_config(seed=42)).state_dict()
    b = build_model(small_config(seed="42")).state_dict()
    c = build_model(small_config(seed=43)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embedding.weight"], c["embedding.weight"])


def test_no_seed_uses_the_global_rng():
    torch.manual_seed(0)
    a = build_model(small_config(seed=None)).embedding.weight
    b = build_model(small_config(seed=None)).embedding.weight
    assert not torch.equal(a, b)


def test_missing_vocab_is_a_clear_error():
    with pytest.raises(ConfigError, match="d_vocab is None"):
        build_model(ModelConfig(d_model=16))


def test_fast_is_the_default_variant_and_reference_is_one_argument_away():
    assert build_model(small_config()).variant == "fast"
    assert build_model(small_config(), variant="reference").variant == "reference"


def test_fast_options_only_apply_to_the_fast_variant():
    from wmfast.fast import FastOptions

    with pytest.raises(ConfigError, match="fast_options only apply"):
        build_model(small_config(), variant="reference", fast_options=FastOptions())


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ConfigError, match="variant must be one of"):
        build_model(small_config(), variant="turbo")


def test_config_edited_into_an_invalid_state_is_caught_at_build():
    config = small_config()
    config.n_heads = 5
    with pytest.raises(ConfigError, match="divisible by n_heads"):
        build_model(config)
