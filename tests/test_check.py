"""The equivalence report: passes on good models, fails on broken ones naming
the first diverging module path, and refuses bad input with exit code 2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from wmfast import backends, build_model, relu_kinks, save_run
from wmfast import check as wc
from wmfast.cli import main
from wmfast.fast import make_fast

from .helpers import put_relu_inputs_at_zero, random_ids, small_config

# The documented JSON layout (README "wmfast check"): fields may be added within
# a schema version, never removed or renamed.
REPORT_KEYS = {"schema", "environment", "settings", "models", "ok"}
MODEL_KEYS = {
    "name",
    "config",
    "ok",
    "first_divergence",
    "ran",
    "comparisons",
    "paths_checked",
    "speed",
    "relu_flips",
    "notes",
}
COMPARISON_KEYS = {"name", "kind", "max_abs", "max_rel", "rtol", "atol", "ok", "path", "relu_flips"}
SETTINGS_KEYS = {
    "variant",
    "device",
    "dtype",
    "batch_size",
    "seq_len",
    "seeds",
    "paths",
    "speed",
    "tolerances",
    "inputs",
    "fast_options",
}


@pytest.fixture(scope="module")
def default_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("check") / "report.json"
    code = main(["check", "--seq-len", "8", "--batch-size", "2", "--json", str(path)])
    return code, json.loads(path.read_text())


def test_default_models_pass_and_the_json_has_the_documented_layout(default_report):
    code, report = default_report
    assert code == 0 and report["ok"] is True
    assert report["schema"] == wc.SCHEMA == "wmfast.check/1"
    assert set(report) == REPORT_KEYS
    assert set(report["settings"]) == SETTINGS_KEYS
    names = [m["name"] for m in report["models"]]
    assert names == [
        "transformer/standard",
        "transformer/rotary",
        "transformer/None",
        "transformer/rotary_qk",
        "rnn",
        "lstm",
    ]
    for model in report["models"]:
        assert set(model) == MODEL_KEYS and model["ok"] and model["first_divergence"] is None
        assert all(set(c) == COMPARISON_KEYS for c in model["comparisons"])
        kinds = {c["kind"] for c in model["comparisons"]}
        assert kinds == {"logits", "grad", "activation", "ablation"}
        assert model["paths_checked"] >= 4
        assert set(model["speed"]) == {"forward", "train_step"}
        assert model["speed"]["forward"]["speedup"] > 0
        assert model["ran"]["variant"] == "fast"
    # every parameter's gradient was compared, in each of the three modes with grad
    first = report["models"][0]
    n_params = len(list(build_model(wc.default_configs()["transformer/standard"]).parameters()))
    grads = [c["name"].split("/")[0] for c in first["comparisons"] if c["kind"] == "grad"]
    assert sorted(set(grads)) == ["eval_grad", "train_answers", "train_no_dropout"]
    assert len(grads) == 3 * n_params


def test_the_report_says_what_ran(default_report):
    _, report = default_report
    ran = {m["name"]: m["ran"] for m in report["models"]}
    on_cuda = torch.device(report["settings"]["device"]).type == "cuda"  # device auto
    assert ran["transformer/rotary_qk"]["compiled_no_grad"] is True  # on every device
    assert ran["transformer/rotary_qk"]["compiled_with_grad"] is on_cuda  # the CPU rule
    rotary = "triton" if on_cuda and backends.triton_installed() else "torch"
    assert ran["transformer/rotary_qk"]["rotary"] == rotary
    assert ran["transformer/rotary_qk"]["attention"] == "sdpa"
    assert ran["transformer/standard"]["rotary"] == "none"  # nothing rotates there
    assert ran["lstm"]["attention"] == "none (recurrent)"
    assert ran["lstm"]["recurrence_with_grad"] == "module"
    assert ran["rnn"]["recurrence_with_grad"] == ("module" if on_cuda else "bptt")
    assert report["environment"]["torch"] == torch.__version__


def _broken_pair(config, break_it):
    reference = build_model(config, variant="reference")
    candidate = make_fast(copy.deepcopy(reference), compile="never")
    break_it(candidate)
    return reference, candidate


def _compare(reference, candidate, paths=False):
    ids = [("seed0", random_ids(0, 50, 2, 6))]
    return wc.compare_models(
        "broken", reference, candidate, ids, device=torch.device("cpu"), paths=paths, speed=False
    )


@pytest.mark.parametrize(
    "param, path",
    [
        ("transformer_encoder.layers.1.linear1.weight", "transformer_encoder.layers.1.linear1"),
        (
            "transformer_encoder.layers.0.self_attn.in_proj_bias",
            "transformer_encoder.layers.0.self_attn",
        ),
        ("embedding.weight", "embedding"),
    ],
)
def test_a_nudged_weight_fails_naming_its_module(param, path):
    def nudge(model):
        # random, not uniform: a constant added to linear1.weight cancels against
        # its input, a LayerNorm output with zero mean over features
        weight = dict(model.named_parameters())[param]
        with torch.no_grad():
            weight.add_(
                1e-2 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
            )

    report = _compare(*_broken_pair(small_config(positional_embedding_type="standard"), nudge))
    assert not report.ok
    assert report.first_divergence == path
    assert any(c.kind == "logits" and not c.ok for c in report.comparisons)


def test_a_wrong_rotary_kernel_in_the_fast_path_fails_naming_the_rotary_module(monkeypatch):
    from wmfast import fast as wf
    from wmfast.models.transformer_functional import _torch_embedding_rotation, _torch_rotary_qk

    def wrong_rotation(q, k, cos, sin):  # rotates by the negative angle
        return _torch_rotary_qk(q, k, cos, -sin)

    monkeypatch.setattr(
        wf,
        "_rotary_functions",
        lambda impl: dict(rotate_qk=wrong_rotation, embed_rotary=_torch_embedding_rotation),
    )
    reference, candidate = _broken_pair(
        small_config(positional_embedding_type="rotary_qk"), lambda m: None
    )
    report = _compare(reference, candidate)
    assert not report.ok
    assert report.first_divergence == "transformer_encoder.layers.0.self_attn.rotary"


def test_a_tail_backward_that_drops_an_answer_row_fails_the_answers_gradients(monkeypatch):
    """The row-sparse backward (wmfast.ops.tail_eager) runs only when the loss
    reads some positions: the answers-only gradients are what catch it."""
    from wmfast.ops import tail_eager

    rows_to_compute = tail_eager.rows_to_compute

    def dropping_the_first_row(grad_logits, multiplied):
        rows = rows_to_compute(grad_logits, multiplied)
        return rows if rows is None else rows[1:]

    monkeypatch.setattr(tail_eager, "rows_to_compute", dropping_the_first_row)
    reference, candidate = _broken_pair(small_config(), lambda m: None)
    ids = [("seed0", random_ids(0, 50, 2, 12))]
    report = wc.compare_models(
        "broken", reference, candidate, ids, device=torch.device("cpu"), paths=False, speed=False
    )
    assert not report.ok
    assert {c.name.split("/")[0] for c in report.failures()} == {"train_answers"}


def test_on_cpu_training_with_dropout_is_compared_mask_for_mask(monkeypatch):
    """A model with dropout gets a fourth comparison on the CPU, train mode with
    its dropout (the same seed on both sides): the fast CPU training step draws
    the reference's masks. Masks handed out in another order fail it alone."""
    from wmfast.models import transformer_functional

    config = small_config(positional_embedding_type="standard", dropout=0.2)
    ids = [("seed0", random_ids(0, 50, 2, 12))]

    def run():
        reference = build_model(config, variant="reference")
        state = torch.random.get_rng_state()
        report = wc.compare_models(
            "dropout", reference, make_fast(reference), ids, device=torch.device("cpu"),
            paths=False, speed=False,
        )  # fmt: skip
        assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG untouched
        return report

    report = run()
    assert report.ok
    assert "train_dropout" in {c.name.split("/")[0] for c in report.comparisons}

    monkeypatch.setattr(
        transformer_functional,
        "_dropout_in_time_major_order",
        lambda sa, p: torch.nn.functional.dropout(sa, p, True),
    )
    report = run()
    assert {c.name.split("/")[0] for c in report.failures()} == {"train_dropout"}
    assert not wc.draws_reference_masks(
        *[build_model(small_config(), variant="reference")] * 2, torch.device("cpu"), "fp32"
    )  # no dropout: nothing to compare


def test_eval_mode_rnn_gradients_on_cuda_are_taken_without_cudnn():
    """cuDNN has no eval-mode RNN backward (PyTorch refuses it, for the
    reference too): around that comparison only, on CUDA, cuDNN is off. The
    CUDA suite runs the comparison itself; this holds the rule on any machine."""
    lstm = build_model(small_config(model_class="lstm"), variant="reference")
    transformer = build_model(small_config(), variant="reference")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    before = torch.backends.cudnn.enabled
    with wc.cudnn_off_for_eval_rnn_backward(lstm, cuda, train=False):
        assert torch.backends.cudnn.enabled is False
    assert torch.backends.cudnn.enabled == before
    for model, device, train in [
        (lstm, cuda, True),
        (lstm, cpu, False),
        (transformer, cuda, False),
    ]:
        with wc.cudnn_off_for_eval_rnn_backward(model, device, train):
            assert torch.backends.cudnn.enabled == before


def test_gradient_atol_scales_with_the_gradients_size():
    want = torch.tensor([200.0, 0.0])
    rounding = torch.tensor([200.0, 5e-5])  # a sum's rounding: relative to its terms
    assert wc.compare("g", "grad", rounding, want, (1e-4, 1e-5)).ok
    assert not wc.compare("l", "logits", rounding, want, (1e-4, 1e-5)).ok
    assert not wc.compare("g", "grad", torch.tensor([200.0, 3e-3]), want, (1e-4, 1e-5)).ok


def _kinked_pair():
    """A reference with one ReLU input of layer 0 at zero (up to rounding), and
    a copy that takes it on the other side: two correct models whose rounding
    differs there, as a fused kernel's may (wmfast.relu_kinks)."""
    reference = build_model(small_config(positional_embedding_type="rotary"), variant="reference")
    ids = random_ids(0, 50, 2, 6)  # _compare's
    put_relu_inputs_at_zero(reference.train(), ids, [(1, 1, 7)])
    kinks, _ = relu_kinks.near_kinks(reference, lambda: reference(ids), 1e-5)
    kink = next(k for k in kinks if k.index == (1, 1, 7))
    return reference, copy.deepcopy(reference), kink


def test_gradients_across_a_relu_kink_pass_and_the_report_says_so(monkeypatch):
    reference, candidate, kink = _kinked_pair()
    with relu_kinks.flipped(candidate, [kink]):
        report = _compare(reference, candidate)
        assert report.ok, report.notes
        flipped = [c for c in report.comparisons if c.relu_flips]
        assert {c.name.split("/")[0] for c in flipped} == {
            "eval_grad",
            "train_no_dropout",
            "train_answers",
        }
        assert all(c.relu_flips == 1 and c.kind == "grad" for c in flipped)
        assert [f["index"] for f in report.relu_flips] == [list(kink.index)] * 3
        assert all(f["path"] == kink.path and f["input"] == kink.value for f in report.relu_flips)
        assert len(report.notes) == 3 and "a kink, not a mismatch" in report.notes[0]
        # without the kink search the same pair fails: the gap is real
        monkeypatch.setattr(wc, "judge_at_kinks", lambda report, label, *a: a[-2])
        report = _compare(reference, candidate)
        assert not report.ok
        assert all(c.kind == "grad" for c in report.failures())


def test_the_cli_prints_the_kink_notes_and_exits_0(monkeypatch, capsys, tmp_path):
    reference, candidate, kink = _kinked_pair()
    flips = relu_kinks.flipped(candidate, [kink])
    flips.__enter__()  # for the whole check (its seed-0 ids are _compare's)
    monkeypatch.setattr(wc, "build_pair", lambda *args: (reference, candidate))
    try:
        code = _run_cli_on_config(reference.config, ["--no-paths", "--no-speed"], tmp_path)
    finally:
        flips.__exit__(None, None, None)
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0
    assert "train_no_dropout/seed0: gradients match the reference with 1 ReLU input(s)" in out


def test_a_wrong_gradient_is_not_explained_away_by_kinks():
    """The model has a kink, but the candidate's gradient below layer 0's
    linear1 is 1% too large (its forward is right): no set of flips explains
    that, so the check fails and says the gap is not a kink."""
    reference, candidate, kink = _kinked_pair()
    linear1 = candidate.transformer_encoder.layers[0].linear1
    linear1.register_forward_hook(lambda m, a, out: out * 1.01 - out.detach() * 0.01)
    report = _compare(reference, candidate)
    assert not report.ok and not report.relu_flips
    assert all(c.ok for c in report.comparisons if c.kind == "logits")
    assert any("does not explain" in note for note in report.notes)


def test_a_relu_flipped_far_from_zero_is_a_mismatch():
    reference, candidate, _ = _kinked_pair()
    ids = random_ids(0, 50, 2, 6)
    linear1 = "transformer_encoder.layers.0.linear1"
    seen = []
    handle = candidate.transformer_encoder.layers[0].linear1.register_forward_hook(
        lambda m, a, out: seen.append(out.detach())
    )
    candidate(ids)
    handle.remove()
    far = tuple(int(i) for i in torch.nonzero(seen[0].abs() > 0.1)[0])
    with relu_kinks.flipped(candidate, [relu_kinks.Kink(linear1, far, float(seen[0][far]))]):
        report = _compare(reference, candidate)
    assert not report.ok and not report.relu_flips


@pytest.mark.nnsight
def test_a_wrong_rotary_module_on_the_traced_path_is_caught_by_the_path_walk(monkeypatch):
    from wmfast import functional as WF
    from wmfast.models.attention import QKRotary

    # a bug in the module class, for the candidate's modules only: its own
    # (untraced) path calls no module, so only the path walk can see it
    broken, correct = set(), QKRotary.forward

    def forward(self, q, k, cos, sin):
        if self in broken:
            return WF.rotary_qk(q, k, sin, cos)
        return correct(self, q, k, cos, sin)

    monkeypatch.setattr(QKRotary, "forward", forward)

    def swap(model):
        broken.update(layer.self_attn.rotary for layer in model.transformer_encoder.layers)

    reference, candidate = _broken_pair(small_config(positional_embedding_type="rotary_qk"), swap)
    report = _compare(reference, candidate, paths=True)
    assert not report.ok
    assert report.first_divergence == "transformer_encoder.layers.0.self_attn.rotary"
    failed = {c.path for c in report.failures()}
    assert "transformer_encoder.layers.0.self_attn.rotary" in failed
    assert all(c.ok for c in report.comparisons if c.kind == "logits")  # untraced path is fine


def test_cli_exits_1_and_names_the_path(monkeypatch, capsys, tmp_path):
    real = wc.build_pair

    def broken_build_pair(config, run, variant, fast_options=None):
        reference, candidate = real(config, run, variant, fast_options)
        candidate = make_fast(copy.deepcopy(reference), compile="never")
        with torch.no_grad():
            candidate.transformer_encoder.layers[0].norm2.weight.mul_(1.01)
        return reference, candidate

    monkeypatch.setattr(wc, "build_pair", broken_build_pair)
    config = small_config(positional_embedding_type="rotary")
    code = _run_cli_on_config(config, ["--no-paths", "--no-speed"], tmp_path)
    out = capsys.readouterr().out
    assert code == 1
    assert "diverges first at transformer_encoder.layers.0.norm2" in out


def _run_cli_on_config(config, extra, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return main(["check", str(path), "--seq-len", "6", "--batch-size", "2", *extra])


def test_check_on_a_run_directory_and_a_yaml_of_named_configs(tmp_path, capsys):
    config = small_config(positional_embedding_type="rotary_qk")
    save_run(tmp_path / "run", build_model(config), config)
    assert main(["check", str(tmp_path / "run"), "--no-paths", "--no-speed", "--seq-len", "6"]) == 0
    configs = {
        "a": small_config(model_class="lstm").to_dict(),
        "b": small_config(model_class="rnn", act_fn="tanh").to_dict(),
    }
    (tmp_path / "many.yaml").write_text(yaml.safe_dump(configs))
    assert (
        main(["check", str(tmp_path / "many.yaml"), "--no-paths", "--no-speed", "--seq-len", "6"])
        == 0
    )
    out = capsys.readouterr().out
    assert "run" in out and "a" in out and "all 2 models within tolerance" in out


def test_check_with_the_users_inputs_and_autocast(tmp_path):
    torch.save(random_ids(5, 50, 3, 7), tmp_path / "ids.pt")
    report = wc.check_equivalence(
        small_config(positional_embedding_type="standard"),
        dtype="bf16",
        input_ids=tmp_path / "ids.pt",
        paths=False,
        speed=False,
        fast_options=None,
        seq_len=5,
    )
    assert report.ok, [c for c in report.models[0].failures()]
    names = [c.name for c in report.models[0].comparisons]
    assert any(n.startswith("eval_no_grad/inputs/") for n in names)
    assert report.models[0].comparisons[0].rtol == 2e-2  # autocast tolerance


def test_device_auto_checks_where_the_models_would_train():
    report = wc.check_equivalence(
        small_config(model_class="lstm"), paths=False, speed=False, seq_len=4
    )
    assert report.ok
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert torch.device(report.settings["device"]).type == expected
    assert report.environment["device"].startswith(expected)


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/run"], "no such config file or checkpoint directory"),
        (["--device", "cuda"], "no CUDA device is available"),
        (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N; got 'tpu'"),
        (["--device", "meta"], "device must be auto, cpu, cuda or cuda:N; got 'meta'"),
        (["--inputs", "/nonexistent/ids.pt"], "cannot read input ids"),
        (["--seeds", "one,two"], "--seeds must be comma-separated integers"),
    ],
)
def test_bad_input_exits_2_with_a_reason(args, message, capsys):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["check", "--no-speed", *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_config_files_exit_2(tmp_path, capsys):
    cases = {
        "broken.yaml": "d_model: [unclosed",
        "unknown.yaml": "d_vocab: 50\nnum_cells: 3\n",
        "novocab.yaml": "model_class: lstm\n",
        "scalar.yaml": "42\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["check", str(tmp_path / name), "--no-speed", "--no-paths"]) == 2, name
    err = capsys.readouterr().err
    assert "cannot read" in err and "num_cells" in err and "no d_vocab" in err


def test_empty_run_directory_exits_2(tmp_path, capsys):
    assert main(["check", str(tmp_path), "--no-speed"]) == 2
    assert "config.yaml not found" in capsys.readouterr().err


def test_missing_nnsight_exits_2_unless_no_paths(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nnsight" else real(name, *a)
    )
    assert main(["check", "--no-speed"]) == 2
    assert "pip install 'wmfast[interp]'" in capsys.readouterr().err
