"""The equivalence report: does a fast model compute what the reference computes?

``check_equivalence(source)`` builds the reference and the candidate variant
from the same weights for every model the source names, and compares them on
seeded random token ids (or the user's):

* logits in eval mode without grad (PyTorch's fused encoder path for the
  reference, the compiled path for a fast model on CPU), in eval mode with
  grad, and in train mode with dropout forced to 0, plus the gradient of every
  parameter in the last two, against the spec's tolerances; the train-mode
  gradients twice: of a loss on every position, and of one on every 4th
  position only, as workingmem's loss reads the answers (the fast CPU
  training step's backward then skips the rows nothing reads:
  wmfast.ops.tail_eager); where gradients differ, whether ReLU inputs of the
  reference within rounding of zero, taken on their other side, explain it
  (``judge_at_kinks``, wmfast.relu_kinks);
* with nnsight (``paths=True``): every module path the reference reaches, in a
  trace with grad enabled, saves the same activation on both, and zeroing it
  changes the logits the same way on both;
* what ran where (device, dtype, compiled or not, rotary implementation and
  attention backend actually used) and the speed ratio of a no-grad forward
  and a training step with workingmem's loss (a slowdown is reported,
  never failed).

On a mismatch the report names the first diverging module path. The JSON
layout (``Report.to_dict``) is versioned by ``SCHEMA`` and documented in
README.md; fields are only ever added within a version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from wmfast import relu_kinks
from wmfast.build import VARIANTS, apply_variant, seed_like_workingmem
from wmfast.checkpoint import CheckpointError, model_from_run, read_run
from wmfast.config import ConfigError, ModelConfig
from wmfast.fast import describe, is_fast, sharing_copy
from wmfast.models import create_model
from wmfast.speed import alternating_medians, call_seconds, repeats_within
from wmfast.training import AUTOCAST_DTYPES, autocast

SCHEMA = "wmfast.check/1"

# SPEC.md section 2. "autocast" compares bf16/fp16 autocast logits with the fp32
# reference; its gradients are compared with the reference under the same
# autocast (comparing low-precision gradients with fp32 ones measures the dtype).
# A gradient's atol is taken relative to its scale, max(1, max |reference
# gradient|) (see compare): each element is a sum over every position,
# and its rounding grows with the size of the terms, not of the element.
# Measured on the default rotary_qk model at batch 8, T 128 (gradients up to
# 220 in magnitude): the reference's own fp32 gradients differ from an fp64
# run by up to 6.9e-5, fast's by up to 5.8e-5, fast from the reference by up
# to 5.7e-5 (at most 1.05e-6 of the scale): an unscaled atol of 1e-5 fails
# the reference against exact arithmetic.
TOLERANCES = {
    "fp32": {"logits": (1e-5, 1e-5), "grads": (1e-4, 1e-5), "paths": (1e-5, 1e-5)},
    "autocast": {"logits": (2e-2, 2e-2), "grads": (2e-2, 2e-2), "paths": (2e-2, 2e-2)},
}

# the built-in default models: every model class and positional type, small;
# 1024 tokens a batch, the size from which the fast CPU training step takes
# its row-sparse tail (wmfast.ops.tail_eager.MIN_TOKENS), so the check covers it
DEFAULT_SIZE = dict(d_vocab=64, d_model=64, n_heads=4, n_layers=2, d_mlp=128, dropout=0.0)
DEFAULT_BATCH, DEFAULT_SEQ_LEN = 8, 128
FAST_PATH = "<untraced fast path>"

# workingmem's loss reads the logits of every 4th position: the answers of
# its Store-Ignore-Recall trials (predicted from the position before each)
ANSWER_EVERY = 4


def answer_rows(seq_len: int) -> torch.Tensor:
    """The positions whose logits workingmem's loss reads, for a length."""
    return torch.arange(ANSWER_EVERY - 2, seq_len, ANSWER_EVERY)


class CheckInputError(ValueError):
    """The check cannot run on what it was given (exit code 2)."""


def default_configs(seed: int = 0) -> dict[str, ModelConfig]:
    configs = {}
    for pe in ("standard", "rotary", None, "rotary_qk"):
        configs[f"transformer/{pe}"] = ModelConfig(
            model_class="transformer", positional_embedding_type=pe, seed=seed, **DEFAULT_SIZE
        )
    configs["rnn"] = ModelConfig(
        model_class="rnn", act_fn="tanh", d_hidden=64, seed=seed, **DEFAULT_SIZE
    )
    configs["lstm"] = ModelConfig(model_class="lstm", d_hidden=64, seed=seed, **DEFAULT_SIZE)
    return configs


# -- report --------------------------------------------------------------------------


@dataclasses.dataclass
class Comparison:
    name: str  # e.g. "eval_grad/seed0/logits", "paths/transformer_encoder.layers.0/output"
    kind: str  # "logits", "grad", "activation", "ablation"
    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    ok: bool
    path: str | None = None  # module path or parameter name
    # grads: compared with the reference taken on the other side of this many
    # ReLU kinks (ModelReport.relu_flips; wmfast.relu_kinks)
    relu_flips: int = 0


@dataclasses.dataclass
class ModelReport:
    name: str
    config: dict
    ok: bool = True
    first_divergence: str | None = None
    ran: dict = dataclasses.field(default_factory=dict)
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)
    paths_checked: int = 0
    speed: dict = dataclasses.field(default_factory=dict)
    # the reference's ReLU inputs taken on their other side of zero where that
    # explained a gradient gap: {"comparisons", "path", "index", "input"}
    relu_flips: list[dict] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # for the reader, pass or fail

    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.ok]


@dataclasses.dataclass
class Report:
    environment: dict
    settings: dict
    models: list[ModelReport]
    schema: str = SCHEMA

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.models)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["ok"] = self.ok
        return out


def _leaves(value: Any) -> list:
    """Tensors (or None) of a possibly nested output, e.g. nn.LSTM's (out, (h, c))."""
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def compare(
    name: str, kind: str, got: Any, want: Any, tol: tuple[float, float], path=None
) -> Comparison:
    """Max abs/rel error of got vs want (tensors, or nested tuples of them) and
    allclose; for kind "grad" the atol scales with each tensor's largest
    magnitude (see TOLERANCES)."""
    rtol, atol = tol
    got_leaves, want_leaves = _leaves(got), _leaves(want)
    if len(got_leaves) != len(want_leaves):
        return Comparison(name, kind, float("inf"), float("inf"), rtol, atol, False, path)
    max_abs = max_rel = 0.0
    ok = True
    for g, w in zip(got_leaves, want_leaves, strict=True):
        if not isinstance(w, torch.Tensor) or not isinstance(g, torch.Tensor):
            ok &= g is None and w is None
            continue
        if g.shape != w.shape:
            return Comparison(name, kind, float("inf"), float("inf"), rtol, atol, False, path)
        if g.numel() == 0:
            continue
        g, w = g.detach().double(), w.detach().double()
        diff = (g - w).abs()
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / w.abs().clamp_min(1e-12)).max()))
        scale = max(1.0, float(w.abs().max())) if kind == "grad" else 1.0
        ok &= bool((diff <= atol * scale + rtol * w.abs()).all())
    return Comparison(name, kind, max_abs, max_rel, rtol, atol, ok, path)


# -- sources -------------------------------------------------------------------------


Source = tuple[ModelConfig, "dict | None"]  # config, and weights to load (a run's) or None


def resolve_source(source: Any = None, seed: int = 0) -> dict[str, Source]:
    """None (the defaults), a ModelConfig, a dict of them, or a path: a run
    directory (best_model.pth + config.yaml) or a YAML file of configs."""
    if source is None:
        return {name: (cfg, None) for name, cfg in default_configs(seed).items()}
    if isinstance(source, ModelConfig):
        return {"model": (source, None)}
    if isinstance(source, dict) and all(isinstance(v, ModelConfig) for v in source.values()):
        return {name: (cfg, None) for name, cfg in source.items()}
    path = Path(source)
    if path.is_dir():
        try:
            run = read_run(path)
        except CheckpointError as exc:
            raise CheckInputError(str(exc)) from None
        return {path.name: (run.config.replace(from_pretrained=str(path)), run)}
    if not path.exists():
        raise CheckInputError(f"no such config file or checkpoint directory: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CheckInputError(f"cannot read {path}: {exc}") from None
    if (
        isinstance(data, dict)
        and "model_class" not in data
        and all(isinstance(v, dict) for v in data.values())
    ):
        items = list(data.items())  # name -> config
    elif isinstance(data, dict):
        items = [(path.stem, data)]
    elif isinstance(data, list) and all(isinstance(v, dict) for v in data):
        items = [(f"{path.stem}[{i}]", cfg) for i, cfg in enumerate(data)]
    else:
        raise CheckInputError(
            f"{path} must hold a config mapping, a list of them, or name -> config"
        )
    try:
        configs = {name: (ModelConfig.from_dict(cfg), None) for name, cfg in items}
    except (ConfigError, TypeError) as exc:
        raise CheckInputError(f"invalid config in {path}: {exc}") from None
    for name, (cfg, _) in configs.items():
        if cfg.d_vocab is None:
            raise CheckInputError(f"config {name!r} in {path} has no d_vocab")
    return configs


def build_pair(
    config: ModelConfig, run, variant: str, fast_options=None
) -> tuple[nn.Module, nn.Module]:
    """(reference, candidate) sharing one set of weights."""
    if run is not None:
        reference = model_from_run(run, config.from_pretrained)
    else:
        seed_like_workingmem(config.seed)
        reference = create_model(config.replace(from_pretrained=None))
    if variant == "reference":
        return reference, reference
    return reference, apply_variant(sharing_copy(reference), variant, fast_options)


# -- running models ----------------------------------------------------------------

DROPOUT_SEED = 4321


def draws_reference_masks(
    reference: nn.Module, candidate: nn.Module, device: torch.device, dtype: str
) -> bool:
    """Whether train mode with dropout can be compared number for number: the
    model has dropout, and the candidate's training step draws its masks as
    the reference does (the uncompiled CPU path, in fp32; compiled code and
    cuDNN draw from other random streams, the same distribution)."""
    has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in reference.modules())
    if not has_dropout or device.type != "cpu" or dtype != "fp32":
        return False
    return not is_fast(candidate) or not describe(candidate, device)["compiled_with_grad"]


@contextlib.contextmanager
def dropout_off(*models: nn.Module) -> Iterator[None]:
    """Dropout probability 0 in every module of ``models``, restored afterwards."""
    saved = []
    for model in models:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                saved.append((module, "p", module.p))
                module.p = 0.0
            elif isinstance(module, nn.MultiheadAttention):
                saved.append((module, "dropout", module.dropout))
                module.dropout = 0.0
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


@contextlib.contextmanager
def cudnn_off_for_eval_rnn_backward(model: nn.Module, device: torch.device, train: bool):
    """cuDNN's RNN kernels have no backward in eval mode (PyTorch raises "cudnn
    RNN backward can only be called in training mode", for the reference too):
    a recurrent model's eval-mode gradients on CUDA are taken with cuDNN off,
    from PyTorch's own RNN kernels. Use it around both sides of a comparison."""
    recurrent = any(isinstance(m, nn.RNNBase) for m in model.modules())
    if device.type != "cuda" or train or not recurrent:
        yield
        return
    saved = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = saved


def _autocast(device: torch.device, dtype: str):
    return autocast(AUTOCAST_DTYPES[dtype], device)


def _param_grads(
    model: nn.Module, logits: torch.Tensor, weight: torch.Tensor
) -> dict[str, torch.Tensor | None]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(
        (logits.float() * weight).sum(), [p for _, p in named], allow_unused=True
    )
    return {n: g for (n, _), g in zip(named, grads, strict=True)}


def compare_grads(
    label: str, got: dict, want: dict, tol: tuple[float, float], relu_flips: int = 0
) -> list[Comparison]:
    """One "grad" comparison per parameter, named ``{label}/grad/{param}``."""
    checks = []
    for param, g in want.items():
        check = compare(f"{label}/grad/{param}", "grad", got[param], g, tol, param)
        check.relu_flips = relu_flips
        checks.append(check)
    return checks


def judge_at_kinks(
    report: ModelReport,
    label: str,
    reference: nn.Module,
    reference_logits: Callable[[], torch.Tensor],
    weight: torch.Tensor,
    got: dict,
    want: dict,
    checks: list[Comparison],
    tol: dict,
) -> list[Comparison]:
    """``checks`` judged again where ReLU kinks may explain them (wmfast.relu_kinks).

    The reference's ReLU inputs within the activations' atol of zero (relative
    to the layer's largest) may lie on either side in a candidate that rounds
    differently. If flipping some of them in the reference makes every
    gradient match, the comparisons against that flipped reference are
    returned, and the flips are listed in ``report.relu_flips``; otherwise
    ``checks`` unchanged, with a note that the gap is not a kink.
    """
    margin = tol["paths"][1]
    failing = [c.path for c in checks if not c.ok and got[c.path] is not None]
    found = relu_kinks.explain_gap(
        reference, reference_logits, lambda: _param_grads(reference, reference_logits(), weight),
        want, got, failing, margin,
    )  # fmt: skip
    flips = found.flips
    if flips:
        rejudged = compare_grads(label, got, found.grads, tol["grads"], len(flips))
        if all(c.ok for c in rejudged):
            worst = max(c.max_abs for c in checks if not c.ok)
            report.notes.append(
                f"{label}: gradients match the reference with {len(flips)} ReLU input(s) "
                f"taken on the other side of zero (at most {max(abs(k.value) for k in flips):.1e} "
                f"from it; gap before: {worst:.2e}): a kink, not a mismatch"
            )
            report.relu_flips += [
                dict(comparisons=label, path=k.path, index=list(k.index), input=k.value)
                for k in flips
            ]
            return rejudged
    if not found.kinks:
        report.notes.append(
            f"{label}: no ReLU input within {margin:g} (relative) of zero: the gradients' "
            "gap is not a kink"
        )
    else:
        report.notes.append(
            f"{label}: {found.total} ReLU input(s) within {margin:g} (relative) of zero; "
            f"flipping {len(flips)} of the nearest {len(found.kinks)} does not explain the "
            "gradients' gap"
        )
    return checks


def reached_paths(
    model: nn.Module, input_ids: torch.Tensor, run: Callable | None = None
) -> dict[str, Any]:
    """Output of every submodule the module path calls (first call), by path, in call order."""
    outputs: dict[str, Any] = {}
    handles = [
        module.register_forward_hook(lambda m, a, o, n=name: outputs.setdefault(n, o))
        for name, module in model.named_modules()
        if name
    ]
    try:
        (run or model.forward_modules)(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _first_tensor(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[1] is None:
        return value[0]  # nn.MultiheadAttention's (output, None)
    return value


def first_divergence(reference: nn.Module, candidate: nn.Module, input_ids, tol) -> str:
    """The first module path (in the reference's call order) whose output differs.

    The candidate's module path (what nnsight traces) is checked first, then its
    untraced fast path, which reports its activations under the same paths
    (transformer_forward's ``record``); FAST_PATH if neither names a module.
    """
    with torch.no_grad():
        want = reached_paths(reference, input_ids)
        runs = [reached_paths(candidate, input_ids)]
        if is_fast(candidate):
            recorded: dict[str, Any] = {}
            candidate._fast(candidate, input_ids, record=lambda p, v: recorded.setdefault(p, v))
            runs.append(recorded)
    for got in runs:
        for path, value in want.items():
            if (
                path in got
                and not compare(
                    path, "activation", _first_tensor(got[path]), _first_tensor(value), tol
                ).ok
            ):
                return path
    return FAST_PATH


# -- nnsight path walk ------------------------------------------------------------------


def envoy_at(root, path: str):
    """The nnsight envoy at a module path such as "transformer_encoder.layers.0"."""
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def trace_output(nm, path: str, input_ids):
    with nm.trace(input_ids):
        saved = envoy_at(nm, path).output.save()
    return saved


def trace_ablation(nm, path: str, input_ids):
    """The logits with the output at ``path`` zeroed (its first tensor, for tuples)."""
    with nm.trace(input_ids):
        out = envoy_at(nm, path).output
        target = out[0] if isinstance(out, tuple) else out
        target[:] = 0
        logits = nm.output.save()
    return logits


def walk_paths(report: ModelReport, reference, candidate, input_ids, tol, progress) -> None:
    from wmfast.interp import NNsight

    nm_ref, nm_cand = NNsight(reference), NNsight(candidate)
    for path in reached_paths(reference, input_ids):
        progress(f"{report.name}: nnsight {path}")
        want = _first_tensor(trace_output(nm_ref, path, input_ids))
        got = _first_tensor(trace_output(nm_cand, path, input_ids))
        report.comparisons.append(
            compare(f"paths/{path}/output", "activation", got, want, tol, path)
        )
        want = trace_ablation(nm_ref, path, input_ids)
        got = trace_ablation(nm_cand, path, input_ids)
        report.comparisons.append(
            compare(f"paths/{path}/ablation", "ablation", got, want, tol, path)
        )
        report.paths_checked += 1


# -- speed ------------------------------------------------------------------------------


def measure_speed(reference, candidate, input_ids, device, dtype, budget_s: float = 0.3) -> dict:
    """Median seconds of a no-grad forward and a training step (forward,
    cross-entropy, backward, AdamW), each model warmed up first (compiles happen
    outside the timing), alternating so drift hits both alike; as many pairs
    as fit in about ``budget_s`` per direction (5 at least)."""
    out = {}

    def forward(model):
        model.eval()
        with torch.no_grad(), _autocast(device, dtype):
            model(input_ids)

    # workingmem's loss: the next token, at the answers only
    rows = answer_rows(input_ids.shape[1] - 1).to(input_ids.device)  # each with a next token
    answers = input_ids[:, rows + 1]

    def train_step(model, optimizer):
        model.train()
        with _autocast(device, dtype):
            logits = model(input_ids)
        loss = nn.functional.cross_entropy(logits[:, rows].float().flatten(0, 1), answers.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # lr 0: the step's arithmetic runs, the shared weights stay as they are
    optimizers = {
        id(m): torch.optim.AdamW(m.parameters(), lr=0.0, weight_decay=0.0)
        for m in (reference, candidate)
    }
    for name, run in (
        ("forward", forward),
        ("train_step", lambda m: train_step(m, optimizers[id(m)])),
    ):
        for model in (reference, candidate):
            run(model)  # warm-up (and compile) outside the timing
        pair_s = call_seconds(lambda run=run: run(reference), device) + call_seconds(
            lambda run=run: run(candidate), device
        )
        r, c = alternating_medians(
            lambda run=run: run(reference),
            lambda run=run: run(candidate),
            device,
            repeats_within(budget_s, pair_s),
        )
        out[name] = {"reference_s": r, "candidate_s": c, "speedup": r / c if c > 0 else None}
    return out


# -- the check --------------------------------------------------------------------------


def compare_models(
    name: str,
    reference: nn.Module,
    candidate: nn.Module,
    inputs: list[tuple[str, torch.Tensor]],
    *,
    device: torch.device,
    dtype: str = "fp32",
    tolerances: dict | None = None,
    paths: bool = True,
    speed: bool = True,
    progress: Callable[[str], None] = lambda msg: None,
) -> ModelReport:
    tol = (tolerances or TOLERANCES)["fp32" if dtype == "fp32" else "autocast"]
    config = reference.config.to_dict() if hasattr(reference, "config") else {}
    report = ModelReport(name=name, config=config)
    weight_gen = torch.Generator().manual_seed(1234)
    for label, ids in inputs:
        progress(f"{name}: {label} eval, no grad (a fast model's first call compiles)")
        reference.eval(), candidate.eval()
        with torch.no_grad():
            want = reference(ids)
            with _autocast(device, dtype):
                got = candidate(ids)
        report.comparisons.append(
            compare(f"eval_no_grad/{label}/logits", "logits", got, want, tol["logits"])
        )
        weights = {"eval_grad": torch.randn(want.shape, generator=weight_gen).to(device)}
        weights["train_no_dropout"] = weights["eval_grad"]
        answers_only = torch.zeros_like(weights["eval_grad"])
        answers_only[:, answer_rows(ids.shape[1])] = 1
        weights["train_answers"] = weights["eval_grad"] * answers_only
        if draws_reference_masks(reference, candidate, device, dtype):
            weights["train_dropout"] = weights["eval_grad"]
        for mode, weight in weights.items():
            progress(f"{name}: {label} {mode.replace('_', ' ')}")
            train = mode != "eval_grad"
            reference.train(train), candidate.train(train)
            dropout = mode == "train_dropout"
            with (
                dropout_off(reference, candidate)
                if train and not dropout
                else contextlib.nullcontext(),
                torch.random.fork_rng(devices=[], enabled=dropout),  # the caller's RNG untouched
                cudnn_off_for_eval_rnn_backward(reference, device, train),
            ):
                if dropout:
                    torch.manual_seed(DROPOUT_SEED)  # the same draws on both sides
                want = reference(ids)
                if dropout:
                    torch.manual_seed(DROPOUT_SEED)
                with _autocast(device, dtype):
                    got = candidate(ids)
                report.comparisons.append(
                    compare(f"{mode}/{label}/logits", "logits", got, want, tol["logits"])
                )

                def reference_logits(dropout=dropout, ids=ids):
                    if dropout:
                        torch.manual_seed(DROPOUT_SEED)
                    # gradients: same precision on both sides (see TOLERANCES)
                    with _autocast(device, dtype):
                        return reference(ids)

                if dtype != "fp32":
                    want = reference_logits()
                want_grads = _param_grads(reference, want, weight)
                got_grads = _param_grads(candidate, got, weight)
                checks = compare_grads(f"{mode}/{label}", got_grads, want_grads, tol["grads"])
                if not all(c.ok for c in checks) and relu_kinks.relu_inputs(reference):
                    progress(f"{name}: {label} {mode.replace('_', ' ')}: looking for ReLU kinks")
                    checks = judge_at_kinks(
                        report, f"{mode}/{label}", reference, reference_logits, weight,
                        got_grads, want_grads, checks, tol,
                    )  # fmt: skip
            report.comparisons.extend(checks)
    reference.eval(), candidate.eval()
    report.ran = describe(candidate, device)
    if is_fast(candidate) and candidate._fast.last_plan is not None:
        report.ran["last_call"] = candidate._fast.last_plan._asdict()
    report.ran["dtype"] = dtype
    if paths:
        with torch.enable_grad():  # under no_grad the fused encoder path skips submodules
            walk_paths(report, reference, candidate, inputs[0][1], tol["paths"], progress)
    report.ok = not report.failures()
    if not report.ok:
        progress(f"{name}: locating the first diverging module path")
        report.first_divergence = first_divergence(reference, candidate, inputs[0][1], tol["paths"])
    if speed:
        progress(f"{name}: timing")
        report.speed = measure_speed(reference, candidate, inputs[0][1], device, dtype)
    return report


def _environment(device: torch.device) -> dict:
    from wmfast import __version__

    env = {"wmfast": __version__, "torch": torch.__version__, "device": str(device)}
    for package in ("triton", "nnsight"):
        spec = importlib.util.find_spec(package)
        if spec is None:
            env[package] = None
        else:
            from importlib.metadata import PackageNotFoundError, version

            try:
                env[package] = version(package)
            except PackageNotFoundError:
                env[package] = "unknown"
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise CheckInputError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}")
    return dev


def check_equivalence(
    source: Any = None,
    *,
    variant: str = "fast",
    device: str = "auto",
    dtype: str = "fp32",
    batch_size: int = DEFAULT_BATCH,
    seq_len: int = DEFAULT_SEQ_LEN,
    seeds: tuple[int, ...] = (0,),
    tolerances: dict | None = None,
    paths: bool = True,
    speed: bool = True,
    input_ids: torch.Tensor | str | os.PathLike | None = None,
    fast_options=None,
    progress: Callable[[str], None] = lambda msg: None,
) -> Report:
    """Compare ``variant`` with the reference for every model ``source`` names.

    Raises CheckInputError (exit code 2 in the CLI) for input the check cannot
    use: unreadable configs, missing checkpoints, CUDA asked for but absent,
    nnsight missing while ``paths`` is on, a bad inputs file. ``device``
    "auto" checks on CUDA when a GPU is present (the path users train on
    there), else on the CPU. ``fast_options`` (wmfast.fast.FastOptions)
    builds the fast model as you will run it, e.g. with ``compile="never"``.
    """
    if variant not in VARIANTS:
        raise CheckInputError(f"variant must be one of {list(VARIANTS)}; got {variant!r}")
    if dtype not in AUTOCAST_DTYPES:
        raise CheckInputError(f"dtype must be one of {list(AUTOCAST_DTYPES)}; got {dtype!r}")
    if batch_size < 1 or seq_len < 1:
        raise CheckInputError("batch size and sequence length must be >= 1")
    if fast_options is not None and variant != "fast":
        raise CheckInputError(f"fast options apply to the fast variant, not to {variant!r}")
    dev = _resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckInputError("device 'cuda' was asked for, but no CUDA device is available")
    if paths and importlib.util.find_spec("nnsight") is None:
        raise CheckInputError(
            "walking module paths needs nnsight: pip install 'wmfast[interp]' (or pass --no-paths)"
        )
    user_ids = _load_inputs(input_ids) if input_ids is not None else None
    models = resolve_source(source, seed=seeds[0])
    reports = []
    for name, (config, run) in models.items():
        progress(f"{name}: building")
        try:
            reference, candidate = build_pair(config, run, variant, fast_options)
        except (ConfigError, CheckpointError) as exc:
            raise CheckInputError(f"{name}: {exc}") from None
        reference.to(dev)
        candidate.to(dev)
        inputs = [
            (
                f"seed{seed}",
                torch.randint(
                    0,
                    config.d_vocab,
                    (batch_size, seq_len),
                    generator=torch.Generator().manual_seed(seed),
                ).to(dev),
            )
            for seed in seeds
        ]
        if user_ids is not None:
            if int(user_ids.max()) >= config.d_vocab:
                raise CheckInputError(
                    f"{name}: input ids reach {int(user_ids.max())}, beyond d_vocab={config.d_vocab}"
                )
            inputs.insert(0, ("inputs", user_ids.to(dev)))
        reports.append(
            compare_models(
                name,
                reference,
                candidate,
                inputs,
                device=dev,
                dtype=dtype,
                tolerances=tolerances,
                paths=paths,
                speed=speed,
                progress=progress,
            )  # fmt: skip
        )
    settings = dict(
        variant=variant, device=str(dev), dtype=dtype, batch_size=batch_size, seq_len=seq_len,
        seeds=list(seeds), paths=paths, speed=speed, tolerances=tolerances or TOLERANCES,
        inputs=str(input_ids) if isinstance(input_ids, (str, os.PathLike)) else None,
        fast_options=dataclasses.asdict(fast_options) if fast_options is not None else None,
    )  # fmt: skip
    return Report(environment=_environment(dev), settings=settings, models=reports)


def _load_inputs(source) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        ids = source
    else:
        try:
            ids = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
            raise CheckInputError(f"cannot read input ids from {source}: {exc}") from None
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or ids.dtype not in (torch.int64, torch.int32)
    ):
        raise CheckInputError("input ids must be a 2-D integer tensor (batch, seq_len)")
    if int(ids.min()) < 0:
        raise CheckInputError("input ids must be >= 0")
    return ids.long()
