"""Reference models: plain eager PyTorch, exactly workingmem's semantics."""

from __future__ import annotations

from torch import nn

from wmfast.config import ModelConfig
from wmfast.models.recurrent import LSTMModel, RNNModel
from wmfast.models.transformer import TransformerModel

MODEL_TYPES: dict[str, type[nn.Module]] = {
    "transformer": TransformerModel,
    "rnn": RNNModel,
    "lstm": LSTMModel,
}


def create_model(config: ModelConfig) -> nn.Module:
    """The reference model for ``config``, initialised from the current RNG state."""
    config.validate()
    return MODEL_TYPES[config.model_class](config)


__all__ = ["MODEL_TYPES", "LSTMModel", "RNNModel", "TransformerModel", "create_model"]
