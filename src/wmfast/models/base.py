"""What every root model shares: the input check and the variant dispatch."""

from __future__ import annotations

import torch
from torch import nn

from wmfast.config import ModelConfig
from wmfast.interp import trace_active
from wmfast.models.inputs import check_input_ids


class WorkingMemoryModel(nn.Module):
    """Base of TransformerModel, RNNModel and LSTMModel.

    forward checks the input (wmfast.models.inputs), then runs
    ``forward_modules``, the path through every documented submodule, or on
    fast models their runner (``_fast``, set by wmfast.fast), which takes that
    path too where hooks or a module changed after building need it.
    """

    _fast = None  # wmfast.fast.FastRunner on fast models
    d_vocab: int
    check_token_ids: bool  # the token-id range check (a device sync on CUDA)

    def _keep_config(self, config: ModelConfig) -> int:
        """Validate ``config`` and keep a private copy of it (later edits of the
        caller's config do not leak in); returns the vocabulary size."""
        config.validate()
        self.d_vocab = config.require_vocab()
        self.config = config.replace()
        self.check_token_ids = True  # see wmfast.models.inputs
        return self.d_vocab

    @property
    def variant(self) -> str:
        return "reference" if self._fast is None else "fast"

    # workingmem's aliases, as plain attributes: registered as submodules they
    # would double the state_dict's keys and every nnsight path of these two
    @property
    def embed(self) -> nn.Module:
        return self.embedding

    @property
    def unembed(self) -> nn.Module:
        return self.output_layer

    @property
    def n_ctx_limit(self) -> int | None:
        """The longest sequence the model takes, or None for no limit."""
        return None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_input_ids(input_ids, self.d_vocab, self.n_ctx_limit, self.check_token_ids)
        # Under an nnsight trace a fast model calls forward_modules from here,
        # as the reference does, so that the root's ``.source`` runs the same
        # operations on both (``model.source.self_forward_modules_0.source``)
        if self._fast is None or trace_active(self):
            return self.forward_modules(input_ids)
        return self._fast(self, input_ids)

    def forward_modules(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:  # type: ignore[override]
        # workingmem's models also register embedding and output_layer as
        # ``embed`` and ``unembed``, so their state_dicts (best_model.pth) hold
        # those weights twice; wmfast's do not (they would double every nnsight
        # path). model.load_state_dict takes such a state_dict: the alias keys
        # are checked against the keys they alias and dropped. (This method,
        # which loads the module's own entries before its children's, is where
        # nn.BatchNorm reads its older keys too.)
        from wmfast.checkpoint import ALIASES, without_aliases

        aliases = tuple(ALIASES)
        # (a model given real embed/unembed submodules loads their keys itself)
        if not any(alias[:-1] in self._modules for alias in aliases):
            ours = [k for k in state_dict if k.startswith(prefix)]
            if any(k[len(prefix) :].startswith(aliases) for k in ours):
                merged = without_aliases({k[len(prefix) :]: state_dict.pop(k) for k in ours})
                state_dict.update((prefix + k, v) for k, v in merged.items())
        super()._load_from_state_dict(state_dict, prefix, *args)
