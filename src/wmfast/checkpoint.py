"""Checkpoints in workingmem's run-directory layout.

A run directory holds::

    best_model.pth          the model's state_dict (with workingmem's alias keys)
    config.yaml             the ModelConfig, workingmem's fields only
    wmfast.yaml             wmfast's added fields (dropout, ...)
    history.yaml            the training history, a list (may be empty)
    checkpoints/epoch_N.pth optional per-epoch state_dicts

Rules that keep these interchangeable with workingmem:

* workingmem registers ``embed``/``unembed`` as aliases of ``embedding`` and
  ``output_layer``, so its state_dicts carry ``embed.weight``,
  ``unembed.weight`` and ``unembed.bias`` too. wmfast's models do not (they
  would double every nnsight path); we write the aliases when saving, so
  workingmem loads our files strictly, and accept files with or without them.
* workingmem builds its config with ``ModelConfig(**yaml)``: unknown keys fail
  there, so wmfast's own fields live in wmfast.yaml.
* Everything is plain YAML (paths as strings) and every file is written to a
  temporary name and renamed into place, so an interrupted save never leaves a
  half-written file. Weights are read with ``torch.load(weights_only=True)``:
  a checkpoint is data, never code.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml
from torch import nn

from wmfast.config import ConfigError, ModelConfig
from wmfast.workingmem_revisions import from_other_revisions

BEST_WEIGHTS = "best_model.pth"
CONFIG_FILE = "config.yaml"
WMFAST_FILE = "wmfast.yaml"
HISTORY_FILE = "history.yaml"
EPOCHS_DIR = "checkpoints"

# workingmem's alias prefix -> the module it aliases
ALIASES = {"embed.": "embedding.", "unembed.": "output_layer."}


class CheckpointError(ValueError):
    """A run directory or checkpoint file cannot be used; the message says why."""


# -- YAML -------------------------------------------------------------------------


class _RunYamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads the pathlib tags workingmem writes.

    After loading a run, workingmem keeps ``from_pretrained`` as a pathlib.Path
    and dumps it as ``!!python/object/apply:pathlib.PosixPath [/, a, b]``, which
    its own safe loader cannot read back. We read that tag (and only it) as a
    plain string path; nothing else beyond safe YAML is constructed.
    """


def _construct_path(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> str:
    if not suffix.endswith("Path") or not isinstance(node, yaml.SequenceNode):
        raise yaml.constructor.ConstructorError(
            None, None, f"unsupported tag python/object/apply:pathlib.{suffix}", node.start_mark
        )
    parts = [str(p) for p in loader.construct_sequence(node)]
    return str(PurePosixPath(*parts)) if parts else "."


_RunYamlLoader.add_multi_constructor(
    "tag:yaml.org,2002:python/object/apply:pathlib.", _construct_path
)


def _read_yaml(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_RunYamlLoader)  # noqa: S506 - safe loader subclass
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{what} {path} is not valid YAML: {exc}") from None


# -- atomic writes ----------------------------------------------------------------


def write_atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write via a temporary file in the same folder, then rename into place.

    A crash or KeyboardInterrupt mid-write leaves the old file (or none) and a
    stray temporary, never a truncated file under the real name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _write_yaml(path: Path, data: Any) -> None:
    text = yaml.safe_dump(data, sort_keys=False)
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


# -- state dicts ------------------------------------------------------------------


def with_aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """state_dict plus workingmem's ``embed.*``/``unembed.*`` alias keys (appended,
    as workingmem's own state_dict orders them)."""
    out = dict(state_dict)
    for alias, target in ALIASES.items():
        for key, value in state_dict.items():
            if key.startswith(target):
                out[alias + key[len(target) :]] = value
    return out


def without_aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the alias keys, after checking they agree with what they alias.

    A file that has only the alias (not the aliased key) is mapped onto it.
    """
    out: dict[str, torch.Tensor] = {}
    aliased: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        alias = next((a for a in ALIASES if key.startswith(a)), None)
        if alias is None:
            out[key] = value
        else:
            aliased[ALIASES[alias] + key[len(alias) :]] = (key, value)
    for target, (key, value) in aliased.items():
        if target not in out:
            out[target] = value
        elif out[target].shape != value.shape or not torch.equal(out[target], value):
            raise CheckpointError(
                f"alias key {key!r} disagrees with {target!r}; the checkpoint is inconsistent"
            )
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .pth state_dict safely (weights_only) with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # garbage bytes make the unpickler raise almost anything
        detail = str(exc).strip().splitlines()
        first_line = f"{type(exc).__name__}: {detail[0]}" if detail else type(exc).__name__
        raise CheckpointError(
            f"cannot read {path}: truncated, corrupt or not a PyTorch checkpoint ({first_line})"
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise CheckpointError(
            f"{path} does not hold a model state_dict (a mapping of names to tensors); "
            f"found {type(data).__name__}"
        )
    return data


def load_state_dict_strict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str
) -> None:
    """Load strictly, naming every missing, unexpected and mis-shaped key."""
    if "embed.W_E" in state_dict:
        raise CheckpointError(
            f"{source} holds a TransformerLens HookedTransformer (keys embed.W_E, "
            f"blocks.N.attn.W_Q, ...), the transformer of workingmem's revisions without "
            f"its nn.TransformerEncoder port: another architecture, which wmfast does not build"
        )
    state_dict = without_aliases(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if mis_shaped:
            parts.append(f"shape mismatches [{'; '.join(mis_shaped)}]")
        raise CheckpointError(
            f"{source} does not fit the model built from its config: " + ", ".join(parts)
        )
    model.load_state_dict(state_dict, strict=True)


# -- run directories --------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What a run directory holds, read and checked."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    history: list
    weights_path: Path


def read_config(run_dir: str | os.PathLike) -> ModelConfig:
    """config.yaml (+ wmfast.yaml if present) as a validated ModelConfig."""
    run_dir = Path(run_dir)
    data = _read_yaml(run_dir / CONFIG_FILE, "config.yaml")
    if not isinstance(data, dict):
        raise CheckpointError(
            f"config.yaml in {run_dir} must hold a mapping of ModelConfig fields; "
            f"found {type(data).__name__}"
        )
    extras_path = run_dir / WMFAST_FILE
    if extras_path.exists():
        extras = _read_yaml(extras_path, "wmfast.yaml") or {}
        if not isinstance(extras, dict):
            raise CheckpointError(f"{extras_path} must hold a mapping")
        data = {**data, **extras}
    try:
        return ModelConfig.from_dict(data)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"invalid config.yaml in {run_dir}: {exc}") from None


def find_weights(run_dir: str | os.PathLike, epoch: int | None = None) -> Path:
    """The weights file: ``checkpoints/epoch_N.pth`` if ``epoch`` is given, else
    the one top-level .pth (exactly one, as workingmem requires)."""
    run_dir = Path(run_dir)
    if epoch is not None:
        path = run_dir / EPOCHS_DIR / f"epoch_{epoch}.pth"
        if not path.is_file():
            raise CheckpointError(f"no checkpoint for epoch {epoch}: {path} does not exist")
        return path
    found = sorted(run_dir.glob("*.pth"))
    if len(found) != 1:
        names = [p.name for p in found]
        raise CheckpointError(
            f"expected exactly one top-level .pth file in {run_dir}, found {len(found)}: {names}"
        )
    return found[0]


def read_run(run_dir: str | os.PathLike, epoch: int | None = None) -> Run:
    """Read and check a run directory (config, weights, history)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {run_dir}")
    config = read_config(run_dir)
    weights = find_weights(run_dir, epoch)
    state_dict = read_state_dict(weights)
    config, state_dict = from_other_revisions(config, state_dict, weights)
    history_path = run_dir / HISTORY_FILE
    history = _read_yaml(history_path, "history.yaml") if history_path.exists() else []
    if history is None:
        history = []
    if not isinstance(history, list):
        raise CheckpointError(f"{history_path} must hold a list; found {type(history).__name__}")
    return Run(config=config, state_dict=state_dict, history=history, weights_path=weights)


def model_from_run(run: Run, run_dir: str | os.PathLike) -> nn.Module:
    """The reference model a read run describes, with its weights loaded strictly."""
    from wmfast.models import create_model

    model = create_model(run.config.replace(from_pretrained=None))
    load_state_dict_strict(model, run.state_dict, str(run.weights_path))
    # workingmem keeps from_pretrained as a pathlib.Path, which it then dumps as a
    # python tag its own loader cannot read; a string round-trips
    model.config.from_pretrained = os.fspath(run_dir)
    return model


def load_model(
    run_dir: str | os.PathLike,
    epoch: int | None = None,
    variant: str = "fast",
    fast_options=None,
) -> nn.Module:
    """Build the model a run directory describes and load its weights strictly."""
    from wmfast.build import apply_variant, check_variant

    check_variant(variant)
    return apply_variant(model_from_run(read_run(run_dir, epoch), run_dir), variant, fast_options)


def save_run(
    run_dir: str | os.PathLike,
    model: nn.Module,
    config: ModelConfig,
    history: list | None = None,
    epoch: int | None = None,
) -> Path:
    """Write a run directory that both wmfast and workingmem load strictly.

    Weights go to ``best_model.pth``, or ``checkpoints/epoch_N.pth`` when
    ``epoch`` is given; config.yaml, wmfast.yaml and history.yaml are
    (re)written beside them. Returns the weights path.
    """
    run_dir = Path(run_dir)
    weights = (
        run_dir / BEST_WEIGHTS if epoch is None else run_dir / EPOCHS_DIR / f"epoch_{epoch}.pth"
    )
    state = {k: v.detach().cpu() for k, v in with_aliases(model.state_dict()).items()}
    write_atomic(weights, lambda f: torch.save(state, f))
    _write_yaml(run_dir / CONFIG_FILE, config.workingmem_dict())
    _write_yaml(run_dir / WMFAST_FILE, config.wmfast_dict())
    save_history(run_dir, history)
    return weights


def save_history(run_dir: str | os.PathLike, history: list | None) -> None:
    """(Re)write history.yaml alone, e.g. after a final test."""
    _write_yaml(Path(run_dir) / HISTORY_FILE, _plain(list(history or [])))


def _plain(value: Any) -> Any:
    """History entries as plain YAML values (dataclasses -> dicts, paths -> str)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
