"""``run_with_cache``: one forward that returns the logits and every module's
output by its module path (the nnsight path), without nnsight: the quick look
TransformerLens users know as ``run_with_cache``.

It registers a forward hook on each submodule it caches and calls the model:
hooks make a fast model take its module path, and make PyTorch skip its fused
encoder path for every layer that holds one (nn.TransformerEncoderLayer
checks), so every documented submodule runs in every mode, even in eval mode
under no_grad, where the reference's fused path otherwise skips
``self_attn``, ``linear1``, ... The outputs are those of the unfused path,
which the fused one matches to ~1.5e-6.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from wmfast.interp import unwrap


def run_with_cache(
    model: nn.Module, input_ids: torch.Tensor, names: Iterable[str] | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(logits, cache)``: ``cache[path]`` is the output of the submodule at
    ``path`` (as ``model.get_submodule(path)`` returns it: a tensor, or a tuple
    such as ``self_attn``'s ``(output, None)``, "rotary_qk"'s rotated ``(q, k)``
    and its ``pos_encoder``'s ``(cos, sin)``), for every submodule or only
    ``names``. Tensors keep their autograd history where grad is enabled.
    ``model`` may be wrapped by nnsight (``wmfast.interp.NNsight(model)``).
    Modules that never run have no entry: containers
    (``transformer_encoder.layers``) and nn.MultiheadAttention's
    ``out_proj``, whose weights it uses without calling it. A module that runs
    twice (none of wmfast's do) keeps its last output.
    """
    model = unwrap(model)
    modules = dict(model.named_modules())
    modules.pop("", None)  # the root's output is the logits
    wanted = list(modules) if names is None else list(names)
    for name in wanted:
        if name not in modules:
            close = difflib.get_close_matches(name, modules, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"{type(model).__name__} has no submodule {name!r}{hint}")

    cache: dict[str, Any] = {}

    def keeper(path: str):
        def keep(module: nn.Module, args: tuple, output: Any) -> None:
            cache[path] = output

        return keep

    handles = [modules[path].register_forward_hook(keeper(path)) for path in wanted]
    try:
        logits = model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return logits, {path: cache[path] for path in wanted if path in cache}
