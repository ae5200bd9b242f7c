"""Input checks every model runs at the top of forward.

Shape, dtype and T > n_ctx are host-side metadata and always checked (free).
The token-id range needs a reduction, which on CUDA is a device-to-host sync:
it is on by default and turned off per model with ``model.check_token_ids =
False`` (the training loop checks each batch on the CPU instead). Under a
user's own torch.compile of a model the range check stays in the graph as an
assert, without the sync (``int()`` of a traced value would break the graph,
and fail ``fullgraph=True``, which workingmem's models pass).
"""

from __future__ import annotations

import torch

TOKEN_DTYPES = (torch.int64, torch.int32)


def check_input_ids(
    input_ids: torch.Tensor, d_vocab: int, n_ctx: int | None, check_range: bool
) -> None:
    """Raise a clear error for input the model cannot take.

    n_ctx: the learned-position limit, or None where the model has no such limit.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"input_ids must be a torch.Tensor of token ids; got {type(input_ids).__name__}"
        )
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be 2-D (batch, seq_len); got shape {tuple(input_ids.shape)}"
        )
    if input_ids.dtype not in TOKEN_DTYPES:
        raise TypeError(
            f"input_ids must hold integer token ids (torch.long or torch.int32); "
            f"got dtype {input_ids.dtype}"
        )
    seq_len = input_ids.shape[1]
    if seq_len == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    if n_ctx is not None and seq_len > n_ctx:
        raise ValueError(
            f"sequence length {seq_len} exceeds n_ctx={n_ctx}, the number of learned "
            f"positions (positional_embedding_type='standard'); raise n_ctx or shorten the input"
        )
    if not check_range:
        return
    if torch.compiler.is_compiling():
        # raises RuntimeError on the CPU; on CUDA a device-side assert (Inductor
        # builds its Triton kernels with asserts on), as embedding's own would be
        in_range = ((input_ids >= 0) & (input_ids < d_vocab)).all()
        torch._assert_async(in_range, _out_of_range("a token id", d_vocab))
        return
    low, high = torch.aminmax(input_ids)
    low, high = int(low), int(high)  # the one sync; see module docstring
    if low < 0 or high >= d_vocab:
        raise ValueError(_out_of_range(f"token id {low if low < 0 else high}", d_vocab))


def _out_of_range(what: str, d_vocab: int) -> str:
    return (
        f"{what} is out of range [0, d_vocab={d_vocab}) "
        f"(set model.check_token_ids = False to skip this check)"
    )
