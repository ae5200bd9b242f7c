"""Drop-in replacements for workingmem's model wrappers.

``TransformerModelWrapper(config)``, ``RNNModelWrapper(config)`` and
``LSTMModelWrapper(config)`` hold ``.model`` (the nn.Module), ``.config``,
``.history`` and ``.device`` (cuda when present), and own checkpointing in
workingmem's layout and training (``train``/``evaluate``/``test``, in
wmfast.training).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from wmfast import checkpoint
from wmfast.build import DEFAULT_VARIANT, apply_variant, build_model, check_variant
from wmfast.config import ConfigError, ModelConfig, TrainingConfig

logger = logging.getLogger("wmfast")


class ModelWrapper:
    """Holds a model built from a ModelConfig; the base of the three wrappers.

    ``ModelWrapper(config)`` itself builds whatever ``config.model_class`` names;
    the subclasses insist on their own class, so a wrapper never silently builds
    a model its config.yaml would later describe differently.
    """

    model_class: ClassVar[str | None] = None
    model: nn.Module
    config: ModelConfig
    history: list

    def __init__(
        self, config: ModelConfig, variant: str = DEFAULT_VARIANT, fast_options=None
    ) -> None:
        self._init_state(variant, fast_options)
        if config.from_pretrained is None:
            self._check_model_class(config)
            self.config = config
            self.model = build_model(config, variant, fast_options).to(self.device)
        else:
            logger.warning(
                "loading model from checkpoint %s; the other ModelConfig fields passed are "
                "ignored: %s",
                config.from_pretrained,
                config,
            )
            self.load_checkpoint(config.from_pretrained)

    def _init_state(self, variant: str, fast_options) -> None:
        check_variant(variant)
        self.variant = variant
        self.fast_options = fast_options
        self.history = []
        # chosen here, at construction, never at import time
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _check_model_class(self, config: ModelConfig) -> None:
        if self.model_class is not None and config.model_class != self.model_class:
            raise ConfigError(
                f"{type(self).__name__} builds model_class={self.model_class!r}, but "
                f"config.model_class={config.model_class!r}; set model_class or use "
                f"the matching wrapper"
            )

    @classmethod
    def from_checkpoint_dir(
        cls,
        ckpt_dir: str | os.PathLike,
        epoch: int | None = None,
        variant: str = DEFAULT_VARIANT,
        fast_options=None,
    ) -> ModelWrapper:
        """A wrapper holding a run directory's model, config and history."""
        wrapper = cls.__new__(cls)
        wrapper._init_state(variant, fast_options)
        wrapper.load_checkpoint(ckpt_dir, epoch=epoch)
        return wrapper

    def load_checkpoint(self, checkpoint_dir: str | os.PathLike, epoch: int | None = None) -> None:
        """Replace model, config and history with a run directory's (strict load)."""
        run = checkpoint.read_run(checkpoint_dir, epoch=epoch)
        self._check_model_class(run.config)
        model = checkpoint.model_from_run(run, checkpoint_dir)
        self.model = apply_variant(model, self.variant, self.fast_options).to(self.device)
        self.config = self.model.config.replace()
        self.history = run.history

    def load_state_dict(self, state_dict: dict, config: ModelConfig | None = None) -> None:
        """``self.model.load_state_dict(state_dict)``, strict, as in workingmem
        (whose ``config`` argument is unused too); its state_dicts' embed/unembed
        alias keys are taken (wmfast.models.base)."""
        self.model.load_state_dict(state_dict)

    def save_checkpoint(
        self, checkpoint_dir: str | os.PathLike, epoch_num: int | None = None
    ) -> Path:
        """Write ``best_model.pth`` (or ``checkpoints/epoch_N.pth``), config.yaml,
        wmfast.yaml and history.yaml into ``checkpoint_dir`` itself.

        workingmem appends its wandb sweep id and run name to the directory;
        without wandb that is a random suffix, so wmfast writes exactly where
        it is told.
        """
        return checkpoint.save_run(
            checkpoint_dir, self.model, self.config, self.history, epoch=epoch_num
        )

    # -- training (wmfast.training) -------------------------------------------------
    def train(
        self,
        dataset,
        training_config: TrainingConfig,
        eval_dataset=None,
        test_dataset=None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        log_to_wandb: bool = False,
        on_step=None,
    ) -> dict:
        """Train on ``dataset`` as workingmem does (see wmfast.training); returns
        the run's history entry. Checkpoints go to ``training_config.checkpoint_dir``."""
        from wmfast import training

        return training.train(
            self, dataset, training_config, eval_dataset, test_dataset,
            resume=resume, overwrite=overwrite, progress=progress, log_to_wandb=log_to_wandb,
            on_step=on_step,
        )  # fmt: skip

    def evaluate(
        self,
        dataset,
        train_epoch: int | None = None,
        predictions_table=None,
        batch_size: int = 128,
        return_predictions: bool = False,
        mask_answer_tokens: bool = True,
        precision: str = "auto",
        *,
        skip_warmup: bool = True,
    ) -> dict:
        """{"loss", "acc", "macro_acc"} on ``dataset``; workingmem's arguments.

        ``return_predictions`` adds "predictions", "actual_labels" and
        "input_sequences"; ``skip_warmup=False`` counts the warm-up's answers
        in "acc" too (wmfast.training.evaluate). As in workingmem, a
        ``predictions_table`` (a wandb.Table with columns epoch, example_ix,
        eval_example, eval_prediction, eval_labels) gets a row per sequence
        when ``train_epoch`` is given; example_ix counts within each batch.
        """
        from wmfast import training

        fill_table = predictions_table is not None and train_epoch is not None
        metrics = training.evaluate(
            self.model, dataset, self.device, batch_size, mask_answer_tokens, precision,
            return_predictions=return_predictions or fill_table, skip_warmup=skip_warmup,
        )  # fmt: skip
        if fill_table:
            _add_prediction_rows(predictions_table, train_epoch, dataset, metrics, batch_size)
        if not return_predictions:
            for key in ("predictions", "actual_labels", "input_sequences"):
                metrics.pop(key, None)
        return metrics

    def test(self, dataset, test_predictions_table=None, mask_answer_tokens: bool = True) -> dict:
        # (workingmem's test passes its table without an epoch, so it gets no rows)
        return self.evaluate(
            dataset, predictions_table=test_predictions_table, mask_answer_tokens=mask_answer_tokens
        )


def _add_prediction_rows(table, epoch: int, dataset, metrics: dict, batch_size: int) -> None:
    """workingmem's rows: the sequence, and the predicted and true answers,
    decoded by the dataset's tokenizer where it has one."""
    tokenizer = getattr(dataset, "tokenizer", None)
    decode = tokenizer.decode if tokenizer is not None else list
    rows = zip(
        metrics["input_sequences"], metrics["predictions"], metrics["actual_labels"], strict=True
    )
    for index, (sequence, predicted, labels) in enumerate(rows):
        table.add_data(
            epoch,
            index % batch_size,
            sequence,
            decode(predicted.tolist()),
            decode(labels.tolist()),
        )


class TransformerModelWrapper(ModelWrapper):
    model_class = "transformer"


class RNNModelWrapper(ModelWrapper):
    model_class = "rnn"


class LSTMModelWrapper(ModelWrapper):
    model_class = "lstm"
