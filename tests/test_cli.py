"""The ``wmfast`` command and the first ``wmfast check``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wmfast.check import default_configs, run_default_checks
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


def test_check_passes_on_the_default_models(capsys):
    assert main(["check", "--seq-len", "9"]) == 0
    out = capsys.readouterr().out
    assert "all 6 models OK" in out
    for name in default_configs():
        assert name in out


def test_check_reports_a_broken_model(monkeypatch, capsys):
    import wmfast.check as check

    real_build = check.build_model

    def build_with_nan(config, variant):
        model = real_build(config, variant)
        if config.model_class == "lstm":
            model.output_layer.bias.data[0] = float("nan")
        return model

    monkeypatch.setattr(check, "build_model", build_with_nan)
    assert main(["check", "--seq-len", "5"]) == 1
    assert "FAILED: lstm" in capsys.readouterr().out


def test_results_have_the_expected_shape():
    results = run_default_checks(batch=2, seq_len=3)
    assert all(r.ok and r.logits_shape == (2, 3, 64) for r in results)


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["check", "--seq-len", "0"])
    assert info.value.code == 2


def test_console_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "wmfast", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("wmfast ")
