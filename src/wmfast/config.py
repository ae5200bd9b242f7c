"""ModelConfig and TrainingConfig: workingmem's field names and defaults, validated.

workingmem builds its configs with ``ModelConfig(**yaml_dict)``, so the field
names, their order and their defaults are part of the drop-in contract. wmfast
only adds fields (listed in ``WMFAST_MODEL_FIELDS``); it never renames or
re-means one. Validation runs at construction and names the field and the
allowed values, so a bad sweep config fails before any GPU time is spent.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any

MODEL_CLASSES = ("transformer", "rnn", "lstm")
POSITIONAL_EMBEDDING_TYPES = ("standard", "rotary", None, "rotary_qk")
# The activation each model class can use: the transformer's FFN takes relu/gelu
# (nn.TransformerEncoderLayer); nn.RNN's nonlinearity takes relu/tanh. nn.LSTM
# has no choice of nonlinearity: workingmem ignores act_fn there, and so do we,
# but a value that no model class knows is still a typo worth reporting.
ACT_FNS = {
    "transformer": ("relu", "gelu"),
    "rnn": ("relu", "tanh"),
    "lstm": ("relu", "gelu", "tanh"),
}

# Fields wmfast adds to workingmem's ModelConfig. They are stored in a second
# file beside config.yaml, because workingmem's loader rejects unknown keys.
WMFAST_MODEL_FIELDS = ("dropout",)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _require_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}; got {value!r}")


def _require_seed(name: str, value: Any) -> None:
    # researchers pass seeds as ints or as strings ("42".."56") from sweep configs
    if value is None or _is_int(value):
        return
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return
    raise ConfigError(
        f"{name} must be None, an integer or a numeric string such as '42'; got {value!r}"
    )


def _from_dict(cls, data: Any):
    """``cls(**data)``, with unknown keys (and non-mappings) a ConfigError naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"a {cls.__name__} must be a mapping; got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}"
        )
    return cls(**data)


def _require_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False; got {value!r}")


@dataclasses.dataclass
class ModelConfig:
    """The model's hyper-parameters, as workingmem names them.

    Field order and defaults follow workingmem's ``ModelConfig``. Fields marked
    "compatibility" are accepted and stored but do not change the model, exactly
    as in workingmem's nn.Transformer port.
    """

    model_class: str = "transformer"
    from_pretrained: str | os.PathLike | None = None
    n_layers: int = 2
    d_model: int = 512
    init_weights: bool = True  # compatibility: workingmem always applies its init
    seed: int | str | None = None
    act_fn: str = "relu"
    attn_only: bool = True  # compatibility: unused by the nn.Transformer port
    n_heads: int = 4
    n_ctx: int = 1205
    d_head: int = 128  # compatibility: the head dim is d_model // n_heads
    d_mlp: int = 0  # 0 is legal: the FFN then outputs exactly linear2.bias
    d_vocab: int | None = None
    positional_embedding_type: str | None = None
    d_hidden: int = 256
    # --- wmfast's own fields (WMFAST_MODEL_FIELDS) ---
    dropout: float = 0.1  # PyTorch's default, which workingmem uses implicitly

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        _require_choice("model_class", self.model_class, MODEL_CLASSES)
        if self.from_pretrained is not None and not isinstance(
            self.from_pretrained, (str, os.PathLike)
        ):
            raise ConfigError(
                f"from_pretrained must be a checkpoint directory path or None; "
                f"got {self.from_pretrained!r}"
            )
        _require_int("n_layers", self.n_layers, 1)
        _require_int("d_model", self.d_model, 1)
        _require_bool("init_weights", self.init_weights)
        _require_seed("seed", self.seed)
        _require_choice(
            f"act_fn (for model_class={self.model_class!r})",
            self.act_fn,
            ACT_FNS[self.model_class],
        )
        _require_bool("attn_only", self.attn_only)
        _require_int("n_heads", self.n_heads, 1)
        _require_int("n_ctx", self.n_ctx, 1)
        _require_int("d_head", self.d_head, 1)
        _require_int("d_mlp", self.d_mlp, 0)
        if self.d_vocab is not None:
            _require_int("d_vocab", self.d_vocab, 1)
        _require_choice(
            "positional_embedding_type",
            self.positional_embedding_type,
            POSITIONAL_EMBEDDING_TYPES,
        )
        _require_int("d_hidden", self.d_hidden, 1)
        if (
            not isinstance(self.dropout, numbers.Real)
            or isinstance(self.dropout, bool)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ConfigError(f"dropout must be a number in [0, 1); got {self.dropout!r}")
        if self.model_class == "transformer":
            self._validate_transformer()

    def _validate_transformer(self) -> None:
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                f"the head dim is d_model // n_heads"
            )
        pe = self.positional_embedding_type
        if pe == "rotary" and self.d_model % 2 != 0:
            raise ConfigError(
                f"positional_embedding_type='rotary' rotates the embedding in pairs "
                f"(i, i + d_model/2), so d_model must be even; got d_model={self.d_model}"
            )
        if pe == "rotary_qk" and self.head_dim % 2 != 0:
            raise ConfigError(
                f"positional_embedding_type='rotary_qk' rotates each head in pairs "
                f"(j, j + head_dim/2), so the head dim d_model // n_heads must be even; "
                f"got {self.d_model} // {self.n_heads} = {self.head_dim}"
            )

    def require_vocab(self) -> int:
        """d_vocab, or a clear error: a config may hold None, a model may not."""
        if self.d_vocab is None:
            raise ConfigError(
                "d_vocab is None: set ModelConfig(d_vocab=...) to the vocabulary size "
                "before building a model (workingmem fills it from its tokenizer; "
                "350 for the default Store-Ignore-Recall task)"
            )
        return self.d_vocab

    # -- derived values -----------------------------------------------------
    @property
    def head_dim(self) -> int:
        """The real attention head width (workingmem's d_head field is unused)."""
        return self.d_model // self.n_heads

    @property
    def seed_int(self) -> int | None:
        return None if self.seed is None else int(self.seed)

    # -- dict / YAML round trip ----------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields, as plain YAML-safe values (paths become strings)."""
        out = dataclasses.asdict(self)
        if out["from_pretrained"] is not None:
            out["from_pretrained"] = os.fspath(out["from_pretrained"])
        return out

    def workingmem_dict(self) -> dict[str, Any]:
        """Only workingmem's fields: what config.yaml holds."""
        return {k: v for k, v in self.to_dict().items() if k not in WMFAST_MODEL_FIELDS}

    def wmfast_dict(self) -> dict[str, Any]:
        """Only wmfast's added fields: what wmfast.yaml holds."""
        return {k: v for k, v in self.to_dict().items() if k in WMFAST_MODEL_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys are an error naming them."""
        return _from_dict(cls, data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class TrainingConfig:
    """Training hyper-parameters, with workingmem's names and defaults.

    The training loop that uses them is the wrappers' ``train`` (a later stage
    of wmfast); the values are validated now so sweep configs fail early.
    """

    epochs: int = 60
    optimizer: str = "adamw"
    learning_rate: float = 4e-4
    weight_decay: float = 0.0
    sparsity: float = 0.0
    checkpoint_dir: str = "model_checkpoints/"
    batch_size: int = 128
    seed: int | str | None = None
    logging_strategy: str = "epoch"
    logging_steps: int = 1
    log_predictions: bool | None = None
    logging_steps_per_epoch: int = 5
    save_strategy: str = "best"
    save_steps: int | None = None
    do_test: bool = True
    mask_answer_tokens: bool = True
    freeze_embeddings: bool | None = None
    # --- wmfast's own fields ---
    # "auto": fp16 autocast + GradScaler on CUDA (workingmem's choice), fp32 on CPU
    precision: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _require_int("epochs", self.epochs, 0)
        _require_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _require_choice("optimizer", self.optimizer, ("adamw",))
        for name in ("learning_rate", "weight_decay", "sparsity"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0; got {value!r}")
        if not isinstance(self.checkpoint_dir, (str, os.PathLike)):
            raise ConfigError(f"checkpoint_dir must be a path; got {self.checkpoint_dir!r}")
        _require_int("batch_size", self.batch_size, 1)
        _require_seed("seed", self.seed)
        _require_choice("logging_strategy", self.logging_strategy, ("epoch", "steps"))
        _require_int("logging_steps", self.logging_steps, 1)
        _require_int("logging_steps_per_epoch", self.logging_steps_per_epoch, 1)
        _require_choice("save_strategy", self.save_strategy, ("best", "epoch"))
        if self.save_steps is not None:
            _require_int("save_steps", self.save_steps, 1)
        _require_bool("do_test", self.do_test)
        _require_bool("mask_answer_tokens", self.mask_answer_tokens)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["checkpoint_dir"] = os.fspath(out["checkpoint_dir"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        return _from_dict(cls, data)
