"""The ``wmfast`` command itself (the check it runs: tests/test_check.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wmfast.check import default_configs
from wmfast.cli import main


def test_default_models_cover_every_class_and_positional_type():
    configs = default_configs()
    assert {c.model_class for c in configs.values()} == {"transformer", "rnn", "lstm"}
    assert {c.positional_embedding_type for c in configs.values()} == {
        "standard",
        "rotary",
        None,
        "rotary_qk",
    }
    for config in configs.values():
        assert (config.d_vocab, config.d_model, config.n_layers, config.d_mlp, config.dropout) == (
            64,
            64,
            2,
            128,
            0.0,
        )


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["check", "--variant", "turbo"])
    assert info.value.code == 2


def test_console_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "wmfast", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("wmfast ")
