"""The training loop behind the wrappers' ``train``, ``evaluate`` and ``test``.

It follows workingmem's loop:

* inputs are dicts with ``token_ids`` and ``answer_locations`` (1 at answers);
  the labels are the answer tokens, and with ``mask_answer_tokens`` the input
  has them replaced by 0 (UNK);
* the loss is cross-entropy at the answer positions only, from the logits of
  the position before each answer, averaged over batch x answers, each answer
  dropped with probability ``sparsity``;
* AdamW; autocast with a GradScaler; evaluation on the eval and test sets every
  ``logging_steps`` epochs; ``best_model.pth`` rewritten whenever the eval
  loss improves; ``checkpoints/epoch_N.pth`` every ``save_steps`` epochs with
  ``save_strategy="epoch"`` and after the last epoch; a final test;
* accuracy over the answers after the first ``2 * concurrent_reg`` (a warm-up
  with nothing to recall), macro accuracy = sequences with every answer right.

Differences, all deliberate: token ids are checked on the CPU before each
batch moves to the device (the model's own check, a device sync, is off while
training); ``precision="auto"`` means fp16 autocast with a GradScaler on CUDA
(workingmem's choice) but fp32 on CPU (workingmem autocasts CPU runs to bf16,
which is slower on most CPUs and changes the numbers); resume state
(optimizer, scaler, RNG, epoch, latest weights) is kept in
``checkpoints/resume.pt``; a NaN loss stops the run before anything is saved;
a directory holding a run is never overwritten unless asked; mid-epoch
evaluations (which only feed logs) run only when logging to wandb.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from wmfast.checkpoint import BEST_WEIGHTS, CONFIG_FILE, EPOCHS_DIR, save_history, write_atomic
from wmfast.config import TrainingConfig
from wmfast.models.inputs import check_input_ids

logger = logging.getLogger("wmfast")

RESUME_FILE = "resume.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a run already in the directory, ...)."""


# -- batches, loss, metrics -------------------------------------------------------


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), answers masked to 0 if asked
    positions: torch.Tensor  # (A,) answer positions, shared by every row
    labels: torch.Tensor  # (B, A) answer tokens

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.positions.to(device), self.labels.to(device))


def prepare_batch(batch: dict, d_vocab: int, mask_answer_tokens: bool) -> Batch:
    """Check a CPU batch and build the model input and labels (workingmem's _step)."""
    ids, locations = batch["token_ids"], batch["answer_locations"]
    check_input_ids(ids, d_vocab, n_ctx=None, check_range=True)  # on the CPU: no device sync
    if locations.shape != ids.shape:
        raise ValueError(
            f"answer_locations {tuple(locations.shape)} must match token_ids {tuple(ids.shape)}"
        )
    if not bool((locations == locations[:1]).all()):
        raise ValueError("every sequence of a batch must have its answers at the same positions")
    positions = locations[0].nonzero().squeeze(1)
    if positions.numel() == 0 or int(positions[0]) == 0:
        raise ValueError(
            "a sequence needs answers, none at position 0 (its logits come from the position before)"
        )
    labels = (ids * locations)[:, positions]
    if mask_answer_tokens:
        ids = ids * (1 - locations)
    return Batch(ids, positions, labels)


def masked_loss(
    logits: torch.Tensor,
    batch: Batch,
    sparsity: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, answer logits (B, A, V)): CE at the answers from the preceding position."""
    answer_logits = logits[:, batch.positions - 1, :]
    loss = F.cross_entropy(answer_logits.float().permute(0, 2, 1), batch.labels, reduction="none")
    if sparsity > 0:
        keep = torch.rand(loss.shape, generator=generator).ge(sparsity).to(loss.device)
        loss = loss * keep
    return loss.mean(), answer_logits


def _warmup_answers(dataset) -> int:
    config = getattr(dataset, "config", None)
    return 2 * getattr(config, "concurrent_reg", 0)


# -- precision -------------------------------------------------------------------------


# precision name -> autocast dtype (None: no autocast, fp32)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    return AUTOCAST_DTYPES[precision]


def autocast(dtype: torch.dtype | None, device: torch.device):
    """torch.autocast to ``dtype`` on ``device``, or nothing for None (fp32)."""
    return (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )


@contextlib.contextmanager
def _range_check_off(model: nn.Module):
    """Batches are checked on the CPU; the model's own check would sync the device."""
    previous = getattr(model, "check_token_ids", True)
    model.check_token_ids = False
    try:
        yield
    finally:
        model.check_token_ids = previous


# -- evaluation --------------------------------------------------------------------------


def evaluate(
    model: nn.Module,
    dataset,
    device: torch.device,
    batch_size: int = 128,
    mask_answer_tokens: bool = True,
    precision: str = "auto",
    return_predictions: bool = False,
    *,
    skip_warmup: bool = True,
) -> dict[str, Any]:
    """{"loss", "acc", "macro_acc"} of ``model`` on ``dataset`` (no grad, eval mode).

    As in workingmem, "loss" is the mean of per-batch means (so it depends a
    little on ``batch_size``), and "acc" counts only the answers after the
    warm-up (NaN for sequences with no answer beyond it). workingmem's
    revisions differ there: its TransformerLens line skips the warm-up, the
    nn.TransformerEncoder port that was read here counts every answer
    (``skip_warmup=False``). "macro_acc" counts every answer in both.

    ``return_predictions`` adds workingmem's "predictions" and
    "actual_labels" ((N, answers) int64 arrays: the argmax at each answer, and
    the answer) and "input_sequences" (each sequence's "tokens" where the
    dataset yields them, as workingmem's do, else its token ids as a list).
    """
    model.eval()
    dtype = autocast_dtype(precision, device)
    losses, predictions, labels, sequences = [], [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with torch.no_grad(), _range_check_off(model):
        for raw in loader:
            if return_predictions:
                sequences.extend(raw["tokens"] if "tokens" in raw else raw["token_ids"].tolist())
            batch = prepare_batch(raw, model.d_vocab, mask_answer_tokens)
            labels.append(batch.labels)  # on the CPU, where the accuracy is counted
            batch = batch.to(device)
            with autocast(dtype, device):
                logits = model(batch.input_ids)
            loss, answer_logits = masked_loss(logits, batch)
            losses.append(float(loss))
            predictions.append(answer_logits.argmax(-1).cpu())
    if not losses:
        raise ValueError("cannot evaluate on an empty dataset")
    predictions, labels = torch.cat(predictions), torch.cat(labels)
    warmup = _warmup_answers(dataset) if skip_warmup else 0
    correct = predictions == labels
    metrics: dict[str, Any] = {
        "loss": float(np.mean(losses)),
        "acc": float(correct[:, warmup:].float().mean()),
        "macro_acc": float(correct.all(dim=1).float().mean()),
    }
    if return_predictions:
        metrics["predictions"] = predictions.numpy()
        metrics["actual_labels"] = labels.numpy()
        metrics["input_sequences"] = sequences
    return metrics


# -- training ------------------------------------------------------------------------------


def _history_entry(dataset, config: TrainingConfig, checkpoint_dir: Path) -> dict[str, Any]:
    """workingmem's TrainingHistoryEntry fields, as a plain dict."""
    return dict(
        dataset_name=repr(dataset),
        dataset_path=None,
        epoch=0,
        batch_size=config.batch_size,
        sparsity=config.sparsity,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        sweep_id=None,
        run_name=None,
        run_url=None,
        checkpoint_dir=str(checkpoint_dir),
        freeze_embeddings=config.freeze_embeddings,
        eval_acc=None,
        eval_macro_acc=None,
        test_acc=None,
        test_macro_acc=None,
        sub_metrics={},
    )


@dataclasses.dataclass
class TrainingState:
    epoch: int = -1  # last completed epoch
    step: int = 0
    best_val_loss: float = math.inf
    best_val_acc: float = 0.0
    best_val_epoch: int = -1


def _refuse_to_overwrite(checkpoint_dir: Path) -> None:
    if (checkpoint_dir / BEST_WEIGHTS).exists() or (checkpoint_dir / CONFIG_FILE).exists():
        raise TrainingError(
            f"{checkpoint_dir} already holds a run; pass resume=True to continue it or "
            f"overwrite=True to replace it"
        )


def _save_resume(path: Path, model, optimizer, scaler, state, history, generator) -> None:
    payload = {
        "state": dataclasses.asdict(state),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "history": history,
        "torch_rng": torch.get_rng_state(),
        "loader_rng": generator.get_state(),
    }
    write_atomic(path, lambda f: torch.save(payload, f))


def train(
    wrapper,
    dataset,
    config: TrainingConfig,
    eval_dataset=None,
    test_dataset=None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log_to_wandb: bool = False,
    on_step=None,
) -> dict[str, Any]:
    """Train ``wrapper.model``; returns the run's history entry.

    ``on_step(step, loss)`` is called after every optimizer step.
    """
    model: nn.Module = wrapper.model
    device: torch.device = wrapper.device
    checkpoint_dir = Path(config.checkpoint_dir)
    resume_path = checkpoint_dir / EPOCHS_DIR / RESUME_FILE
    wandb = _wandb() if log_to_wandb else None

    if config.seed is not None:
        torch.manual_seed(int(config.seed))
    generator = torch.Generator().manual_seed(int(config.seed) if config.seed is not None else 0)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    dtype = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = TrainingState()

    if resume:
        if not resume_path.is_file():
            raise TrainingError(f"nothing to resume: {resume_path} does not exist")
        saved = torch.load(resume_path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state = TrainingState(**saved["state"])
        wrapper.history = saved["history"]
        torch.set_rng_state(saved["torch_rng"])
        generator.set_state(saved["loader_rng"])
        entry = wrapper.history[-1]
        logger.info("resuming %s after epoch %d", checkpoint_dir, state.epoch)
    else:
        if not overwrite:
            _refuse_to_overwrite(checkpoint_dir)
        entry = _history_entry(dataset, config, checkpoint_dir)
        wrapper.history.append(entry)

    if config.freeze_embeddings:
        for param in (*model.embedding.parameters(), *model.output_layer.parameters()):
            param.requires_grad_(False)

    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)
    eval_sets = [
        d
        for d in (eval_dataset if isinstance(eval_dataset, list) else [eval_dataset])
        if d is not None
    ]
    test_sets = [
        d
        for d in (test_dataset if isinstance(test_dataset, list) else [test_dataset])
        if d is not None
    ]

    def run_eval(datasets) -> dict[str, float] | None:
        if not datasets:
            return None
        results = [
            evaluate(
                model,
                d,
                device,
                mask_answer_tokens=config.mask_answer_tokens,
                precision=config.precision,
            )
            for d in datasets
        ]
        model.train()
        return {k: float(np.mean([r[k] for r in results])) for k in results[0]}

    bar = _ProgressBar(enabled=progress, epochs=config.epochs, steps=len(loader))
    with bar, _range_check_off(model):
        for epoch in range(state.epoch + 1, config.epochs):
            model.train()
            entry["epoch"] = epoch
            for epoch_step, raw in enumerate(loader):
                if state.best_val_acc >= 0.999:  # workingmem stops stepping once solved
                    break
                batch = prepare_batch(raw, model.d_vocab, config.mask_answer_tokens)
                started = time.perf_counter()
                batch = batch.to(device)  # once: the ids, the answer positions, the labels
                with autocast(dtype, device):
                    logits = model(batch.input_ids)
                loss, _ = masked_loss(logits, batch, config.sparsity, generator)
                scaler.scale(loss).backward()
                # one sync per step (progress and the NaN guard need the value),
                # after the backward is queued: on a GPU the backward then runs
                # while the host waits for the forward's loss, where a sync
                # before it left the GPU idle while the host queued it
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):  # before the step: the weights stay finite
                    # and no NaN gradient is left to add into a later run's first step
                    optimizer.zero_grad(set_to_none=True)
                    raise TrainingError(
                        f"loss is {loss_value} at epoch {epoch}, step {epoch_step}: training stopped and "
                        f"nothing was saved (the last good checkpoint in {checkpoint_dir} is intact); "
                        f"lower the learning rate or use precision='fp32'"
                    )
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                tokens = batch.input_ids.numel() / (time.perf_counter() - started)
                bar.update(epoch, epoch_step, loss_value, tokens)
                if on_step is not None:
                    on_step(state.step, loss_value)
                if wandb is not None:
                    wandb.log({"epoch": epoch, "step": state.step, "train_loss": loss_value})
                    _mid_epoch_eval(
                        wandb, config, epoch_step, len(loader), run_eval, eval_sets, test_sets
                    )

            if config.logging_steps and epoch % config.logging_steps == 0:
                metrics = run_eval(eval_sets)
                tests = run_eval(test_sets)
                if metrics is not None:
                    entry["eval_acc"], entry["eval_macro_acc"] = (
                        metrics["acc"],
                        metrics["macro_acc"],
                    )
                    bar.note(
                        f"epoch {epoch}: eval loss {metrics['loss']:.4f}, acc {metrics['acc']:.3f}"
                    )
                    if metrics["loss"] < state.best_val_loss:
                        state.best_val_loss, state.best_val_epoch = metrics["loss"], epoch
                        state.best_val_acc = max(state.best_val_acc, metrics["acc"])
                        wrapper.save_checkpoint(checkpoint_dir)
                if tests is not None:
                    entry["test_acc"], entry["test_macro_acc"] = tests["acc"], tests["macro_acc"]
                if wandb is not None:
                    wandb.log(
                        {"epoch": epoch, **_prefixed("eval", metrics), **_prefixed("test", tests)}
                    )
            if (
                config.save_strategy == "epoch"
                and config.save_steps
                and epoch % config.save_steps == 0
            ):
                wrapper.save_checkpoint(checkpoint_dir, epoch_num=epoch)
            state.epoch = epoch
            _save_resume(resume_path, model, optimizer, scaler, state, wrapper.history, generator)

    if state.epoch >= 0:
        wrapper.save_checkpoint(checkpoint_dir, epoch_num=state.epoch)
    if not eval_sets:  # nothing decided a best model: the last one is it
        wrapper.save_checkpoint(checkpoint_dir)
    if config.do_test and test_sets:
        tests = run_eval(test_sets)
        entry["test_acc"], entry["test_macro_acc"] = tests["acc"], tests["macro_acc"]
        save_history(checkpoint_dir, wrapper.history)  # the weights on disk stay the best ones
    return entry


def _prefixed(prefix: str, metrics: dict | None) -> dict:
    return {f"{prefix}_{k}": v for k, v in (metrics or {}).items()}


def _mid_epoch_eval(wandb, config, epoch_step, steps, run_eval, eval_sets, test_sets) -> None:
    every = max(1, steps // max(1, config.logging_steps_per_epoch))
    if config.logging_steps_per_epoch and epoch_step % every == 0:
        wandb.log(
            {**_prefixed("eval", run_eval(eval_sets)), **_prefixed("test", run_eval(test_sets))}
        )


def _wandb():
    try:
        import wandb
    except ImportError as exc:
        raise TrainingError("log_to_wandb=True needs wandb: pip install wandb") from exc
    return wandb


class _ProgressBar:
    """A rich progress bar with the loss and tokens/s, or nothing."""

    def __init__(self, enabled: bool, epochs: int, steps: int) -> None:
        self.enabled, self.epochs, self.steps = enabled, epochs, steps
        self._progress = self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]train[/] epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tokens]:,.0f} tok/s"),
                TimeRemainingColumn(),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                "train", total=self.epochs * self.steps, epoch=0, loss=math.nan, tokens=0
            )
        return self

    def update(self, epoch: int, step: int, loss: float, tokens: float) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=epoch * self.steps + step + 1,
                epoch=epoch,
                loss=loss,
                tokens=tokens,
            )

    def note(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            logger.info(message)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
