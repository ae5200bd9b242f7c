"""Runs written by workingmem revisions other than the one wmfast reproduces.

wmfast builds the models of the revision its guide documents (the
nn.TransformerEncoder port; shared/golden holds that code's outputs). Runs of
two other revisions hold weights of the same functions under another
layout, and load after the conversions here (``from_other_revisions``):

* **d_mlp 0 built 4 * d_model wide.** One revision of the port builds
  ``dim_feedforward = 4 * d_model`` for d_mlp 0 (wmfast, like the guide's
  revision, builds ``Linear(d_model, 0)``: a block that outputs linear2's
  bias) and still writes ``d_mlp: 0`` into config.yaml. Its checkpoints hold
  that width in every layer's linear1; the model that computes what they
  computed is the one of that width.
* **The nn.Sequential RNN/LSTM.** The revisions without the port (its
  TransformerLens line) build the RNN and LSTM as ``nn.Sequential(embed,
  rnn | lstm, unembed)`` (in older files numbered 0, 1, 2): the same
  embedding, recurrence and output layer, so their weights load under
  wmfast's names (``rnn_core.rnn``, ``lstm_core.lstm``; ``embed``/``unembed``
  are the aliases wmfast.checkpoint maps anyway). A bare
  ``model.load_state_dict`` of such a state_dict converts it too (the
  recurrent models' ``_load_from_state_dict``).

Their Transformer is a TransformerLens HookedTransformer, another
architecture: wmfast.checkpoint names it in its load error instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from wmfast.config import ModelConfig

logger = logging.getLogger("wmfast")


def from_other_revisions(
    config: ModelConfig, state_dict: dict[str, torch.Tensor], source: Path
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state_dict) as wmfast builds and names them; unchanged for
    runs of wmfast's own revision (and for anything unrecognised, which the
    strict load then reports)."""
    if config.model_class == "transformer":
        return _with_the_feed_forward_width_of(state_dict, config, source), state_dict
    return config, from_the_sequential_layout(state_dict, config.model_class)


def _with_the_feed_forward_width_of(
    state_dict: dict[str, torch.Tensor], config: ModelConfig, source: Path
) -> ModelConfig:
    """``config`` with d_mlp set to 4 * d_model where it says 0 but every
    layer's linear1 has that width (the 4 * d_model revision, above)."""
    if config.d_mlp != 0:
        return config
    widths = {
        tuple(value.shape)
        for key, value in state_dict.items()
        if key.startswith("transformer_encoder.layers.") and key.endswith(".linear1.weight")
    }
    width = 4 * config.d_model
    if widths != {(width, config.d_model)}:
        return config
    logger.warning(
        "%s: config.yaml says d_mlp 0 but every layer's feed-forward block has width "
        "4 * d_model = %d (written by a workingmem revision that builds d_mlp 0 that "
        "wide); loading it as d_mlp=%d",
        source,
        width,
        width,
    )
    return config.replace(d_mlp=width)


def from_the_sequential_layout(
    state_dict: dict[str, torch.Tensor], model_class: str
) -> dict[str, torch.Tensor]:
    """The nn.Sequential RNN/LSTM's keys under wmfast's module paths."""
    core = f"{model_class}_core.{model_class}."  # rnn_core.rnn., lstm_core.lstm.
    if any(key.startswith(core) for key in state_dict):
        return state_dict  # wmfast's layout
    # nn.Sequential's entry, by name or by number -> wmfast's module path
    renames = {"0.": "embedding.", "1.": core, f"{model_class}.": core, "2.": "output_layer."}
    out = {}
    for key, value in state_dict.items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        out[key if prefix is None else renames[prefix] + key[len(prefix) :]] = value
    return out
