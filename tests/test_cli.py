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


def test_train_command_writes_a_run_and_resumes_it(tmp_path, capsys):
    from wmfast import load_model

    args = [
        "train",
        "--out",
        str(tmp_path / "run"),
        "--d-model",
        "32",
        "--trials",
        "6",
        "--n-train",
        "64",
        "--n-eval",
        "16",
        "--epochs",
        "1",
    ]
    assert main(args) == 0
    assert "trained transformer for 1 epochs" in capsys.readouterr().out
    assert load_model(tmp_path / "run").config.d_vocab == 350
    assert main(args) == 1  # a run is there: never silently overwritten
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args[:-1], "2", "--resume"]) == 0
    assert main([*args, "--n-heads", "5"]) == 2  # a bad config: exit 2
    assert "divisible by n_heads" in capsys.readouterr().err


def test_the_ran_column_names_the_training_choices_where_they_differ():
    from types import SimpleNamespace

    from wmfast.cli import _ran

    ran = dict(variant="fast", compiled_with_grad=True, attention="sdpa")
    cuda_rotary = SimpleNamespace(
        ran=dict(
            ran, rotary="triton", rotary_with_grad="torch", norm="torch", norm_with_grad="triton"
        )
    )
    assert (
        _ran(cuda_rotary) == "compiled; triton rotary (torch training); triton norm training; sdpa"
    )
    cpu_standard = SimpleNamespace(
        ran=dict(ran, rotary="none", rotary_with_grad="none", norm="torch", norm_with_grad="torch")
    )
    assert _ran(cpu_standard) == "compiled; sdpa"
    recurrent = dict(variant="fast", attention="none (recurrent)", recurrence="module")
    cpu_rnn = dict(recurrent, recurrence_with_grad="bptt", output_layer_with_grad="answer rows")
    assert _ran(SimpleNamespace(ran=cpu_rnn)) == "module path; training: bptt, answer-row output"
    cpu_lstm = dict(cpu_rnn, recurrence_with_grad="module")
    assert _ran(SimpleNamespace(ran=cpu_lstm)) == "module path; training: answer-row output"
    # where the check recorded its last call (a training one), what that ran
    small_rnn = dict(cpu_rnn, last_call=dict(recurrence="bptt", output_layer="module"))
    assert _ran(SimpleNamespace(ran=small_rnn)) == "module path; training: bptt"
    small_lstm = dict(
        cpu_lstm, device="cpu", last_call=dict(recurrence="module", output_layer="module")
    )
    assert _ran(SimpleNamespace(ran=small_lstm)) == "module path"
    cuda = dict(
        recurrent, device="cuda:0", recurrence_with_grad="module", output_layer_with_grad="module"
    )
    assert _ran(SimpleNamespace(ran=cuda)) == "module path (cuDNN)"


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["compile"], "KEY=VALUE"),
        (["speed=max"], "no FastOptions field ['speed']"),
        (["compile=sometimes"], "FastOptions.compile must be one of"),
        (["dynamic=maybe"], "FastOptions.dynamic must be one of"),
    ],
)
def test_bad_fast_options_exit_2_naming_the_problem(pairs, message, capsys):
    args = ["check", "--no-paths", "--no-speed"]
    for pair in pairs:
        args += ["--option", pair]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_fast_options_are_refused_for_the_reference_variant(capsys):
    assert main(["check", "--variant", "reference", "--option", "compile=never"]) == 2
    assert "apply to the fast variant" in capsys.readouterr().err


def test_fast_options_build_the_checked_model(tmp_path):
    import json

    import yaml

    from .helpers import small_config

    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump(small_config(positional_embedding_type="rotary").to_dict()))
    report = tmp_path / "report.json"
    args = ["check", str(config), "--no-paths", "--no-speed", "--json", str(report)]
    args += ["--option", "compile=never", "--option", "rotary=torch", "--option", "dynamic=true"]
    assert main(args) == 0
    data = json.loads(report.read_text())
    expected = dict(compile="never", rotary="torch", dynamic=True)
    assert {k: data["settings"]["fast_options"][k] for k in expected} == expected
    ran = data["models"][0]["ran"]
    assert {k: ran["options"][k] for k in expected} == expected
    assert not ran["compiled_no_grad"]
