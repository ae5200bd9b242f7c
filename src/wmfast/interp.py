"""Everything nnsight: the one module that touches its internals.

* ``trace_active(module)``: whether an nnsight trace is running through this
  module now. Fast models ask it on every call to choose between their
  compiled path (untraced) and their eager, every-submodule-called path
  (traced). It reads the state nnsight 0.8 installs on each wrapped module and
  never imports nnsight, so it costs a dict lookup on a model nnsight never saw.
* ``why_submodules_must_run(module)``: whether calling the submodules would do
  more than the fast path (which calls none) computes: PyTorch hooks, or a
  forward replaced on an instance; fast models then take their module path too.
* ``unwrap(model)``: the torch module inside an nnsight wrapper.
* ``NNsight``: ``nnsight.NNsight`` plus batching of several invokes that each
  take a (B, T) token-id tensor, so clean and ablated runs share one trace.
  This replaces the guide's ``LanguageModel(model.model)``, which fails on
  these models (they have no tokenizer).

nnsight is imported only when ``NNsight`` is first used (``import nnsight``
takes seconds and patches objects process-wide). Tested against nnsight
``SUPPORTED_NNSIGHT``; the state layout read by ``trace_active`` is pinned to it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules import module as torch_module

SUPPORTED_NNSIGHT = (">=0.8", "<0.9")

# nnsight 0.8 keeps per-module state at module.__dict__["__nnsight__"]
# (nnsight.intervention.source.STATE): a State whose ``routes`` hold
# (weakref to Interleaver, path, locations); an Interleaver's ``interleaving``
# is True while a trace runs through it. Its ``original`` is the (unbound)
# forward the module had when wrapped, which nnsight's Controller, installed
# as the instance's ``forward``, runs outside traces.
_NNSIGHT_STATE = "__nnsight__"


def trace_active(module: torch.nn.Module) -> bool:
    """True while an nnsight trace is running through ``module``."""
    state = module.__dict__.get(_NNSIGHT_STATE)
    if state is None:
        return False
    for route in state.routes:
        interleaver = route[0]()
        if interleaver is not None and interleaver.interleaving:
            return True
    return False


HOOKS = "hooks are registered"


def why_submodules_must_run(module: torch.nn.Module) -> str | None:
    """Why calling ``module``'s submodules would do something that the fast
    path, which calls none of them, skips; None when nothing would be skipped.

    ``HOOKS``: a forward or backward (pre-)hook is registered on a submodule
    or globally; the fast model runs its module path, and the hooks fire as on
    the reference (backward hooks too: a module's full backward hooks are
    attached when the module is called). Otherwise "<path>.forward is set on
    the instance": a submodule's forward was replaced (a monkeypatched
    ablation, ``types.MethodType``), which the fast path would ignore.
    nnsight's own forward on a wrapped module is not a replacement while what
    it runs outside a trace is still the class's forward."""
    if (
        torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    ):
        return HOOKS
    # a walk over the _modules dicts rather than module.modules(): fast models
    # ask on every call, and that generator with its memo took 25 us for a
    # two-layer transformer (this walk: ~7 us, ~12 once nnsight wrapped it).
    # No memo: a module held twice is looked at twice, which costs only time
    # (a module tree with a cycle breaks state_dict and repr first)
    stack = [module]
    while stack:
        for child in stack.pop()._modules.values():
            if child is None:  # an empty slot
                continue
            attributes = child.__dict__  # (read once: each attribute lookup costs)
            if (
                attributes["_forward_hooks"]
                or attributes["_forward_pre_hooks"]
                or attributes["_backward_hooks"]
                or attributes["_backward_pre_hooks"]
            ):
                return HOOKS
            if "forward" in attributes and _forward_replaced(child, attributes):
                path = next(name for name, sub in module.named_modules() if sub is child)
                return f"{path}.forward is set on the instance"
            stack.append(child)
    return None


def _forward_replaced(module: torch.nn.Module, attributes: dict) -> bool:
    """Whether ``module``'s forward, set on the instance (``attributes``, its
    __dict__, holds one), is another function than its class's."""
    forward = attributes["forward"]
    state = attributes.get(_NNSIGHT_STATE)
    if state is not None and type(forward).__name__ == "Controller":
        # nnsight 0.8's controller: outside a trace it runs state.original,
        # the forward the module had when nnsight wrapped it (unbound)
        forward = state.original
    elif getattr(forward, "__self__", None) is module:
        forward = forward.__func__  # a method bound on the instance itself
    return forward is not type(module).forward


def unwrap(model: Any) -> Any:
    """The torch module an nnsight wrapper (``NNsight(model)``) holds, or
    ``model`` itself: for functions that take the plain module."""
    if isinstance(model, torch.nn.Module):
        return model
    inner = getattr(model, "_module", None)  # where nnsight 0.8's Envoy keeps it
    return inner if isinstance(inner, torch.nn.Module) else model


def _check_nnsight_version(version: str) -> None:
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    if not (0, 8) <= major_minor < (0, 9):
        raise ImportError(
            f"wmfast.interp supports nnsight {','.join(SUPPORTED_NNSIGHT)}; found {version}. "
            f"pip install 'wmfast[interp]' installs a supported version."
        )


def _make_nnsight_class() -> type:
    try:
        import nnsight
    except ImportError as exc:
        raise ImportError(
            "wmfast.interp.NNsight needs nnsight: pip install 'wmfast[interp]'"
        ) from exc
    _check_nnsight_version(nnsight.__version__)

    class NNsight(nnsight.NNsight):
        """nnsight.NNsight for wmfast models: invokes that each take token ids batch.

        Each invoke's input is a (B_i, T) token-id tensor; the invokes are
        concatenated along the batch for one forward, and each invoke sees (and
        edits) only its own rows::

            model = wmfast.interp.NNsight(fast_model)
            with model.trace() as tracer:
                with tracer.invoke(clean_ids):
                    clean = model.output.save()
                with tracer.invoke(clean_ids):
                    model.pos_encoder.output[:] = 0
                    ablated = model.output.save()
        """

        def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
            ids = inputs[0] if inputs else kwargs.get("input_ids")
            if ids is None:
                return 0
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
                raise ValueError(
                    "each invoke takes a (batch, seq_len) tensor of token ids; got "
                    f"{type(ids).__name__} {tuple(getattr(ids, 'shape', ()))}"
                )
            return ids.shape[0]

        def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
            if not invokes:
                return (), {}
            if len(invokes) == 1:
                return invokes[0]
            ids = [args[0] if args else kwargs["input_ids"] for args, kwargs in invokes]
            lengths = sorted({t.shape[1] for t in ids})
            if len(lengths) > 1:
                raise ValueError(
                    f"invokes batched into one forward must share a sequence length; got "
                    f"{lengths} (these models take no padding mask: trace them separately)"
                )
            return (torch.cat(ids, dim=0),), {}

    NNsight.__module__ = __name__
    return NNsight


_cached: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name == "NNsight":
        if name not in _cached:
            _cached[name] = _make_nnsight_class()
        return _cached[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
