"""The workingmem RNN and LSTM, reference variant.

    embedding      nn.Embedding(d_vocab, d_model)       (no sqrt scaling)
    rnn_core       RNNCore, holding .rnn = nn.RNN(...)   -> output sequence only
    lstm_core      LSTMCore, holding .lstm = nn.LSTM(...) -> output sequence only
    output_layer   nn.Linear(d_hidden, d_vocab)

Unidirectional, zero initial state, no dropout, PyTorch's default init.
"""

from __future__ import annotations

import torch
from torch import nn

from wmfast.config import ModelConfig
from wmfast.models.base import WorkingMemoryModel
from wmfast.workingmem_revisions import from_the_sequential_layout


class RNNCore(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, n_layers: int, nonlinearity: str) -> None:
        super().__init__()
        self.rnn = nn.RNN(d_model, d_hidden, n_layers, batch_first=True, nonlinearity=nonlinearity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(x)  # (B, T, d_hidden); the final state is dropped
        return output


class LSTMCore(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, n_layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_model, d_hidden, n_layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(x)  # (B, T, d_hidden); (h_n, c_n) are dropped
        return output


class _RecurrentModel(WorkingMemoryModel):
    core_name: str  # "rnn_core" or "lstm_core"

    def __init__(self, config: ModelConfig, make_core) -> None:
        super().__init__()
        d_vocab = self._keep_config(config)
        # construction order = RNG draw order = workingmem's order; do not reorder
        self.embedding = nn.Embedding(d_vocab, config.d_model)
        setattr(self, self.core_name, make_core(config))
        self.output_layer = nn.Linear(config.d_hidden, d_vocab)

    def forward_modules(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The path through every documented submodule (what nnsight traces)."""
        x = self.embedding(input_ids)  # (B, T, d_model)
        h = getattr(self, self.core_name)(x)  # (B, T, d_hidden)
        return self.output_layer(h)  # (B, T, d_vocab)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:  # type: ignore[override]
        # workingmem's revisions without its nn.TransformerEncoder port build
        # this model as nn.Sequential(embed, rnn | lstm, unembed): the same
        # functions under other keys, renamed here as their run directories
        # are (wmfast.workingmem_revisions)
        ours = {
            k[len(prefix) :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)
        }
        renamed = from_the_sequential_layout(ours, self.core_name.removesuffix("_core"))
        state_dict.update((prefix + k, v) for k, v in renamed.items())
        super()._load_from_state_dict(state_dict, prefix, *args)


class RNNModel(_RecurrentModel):
    core_name = "rnn_core"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, lambda c: RNNCore(c.d_model, c.d_hidden, c.n_layers, c.act_fn))


class LSTMModel(_RecurrentModel):
    core_name = "lstm_core"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, lambda c: LSTMCore(c.d_model, c.d_hidden, c.n_layers))
