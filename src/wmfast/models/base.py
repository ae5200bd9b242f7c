"""What every root model shares: the input check and the variant dispatch."""

from __future__ import annotations

import torch
from torch import nn

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

    @property
    def variant(self) -> str:
        return "reference" if self._fast is None else "fast"

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
