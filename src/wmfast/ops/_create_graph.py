"""Backwards that autograd can differentiate again, for wmfast's eager
autograd Functions.

Those Functions write their gradients with in-place kernels from saved
intermediates that carry no graph: right for a plain backward, but a
backward with ``create_graph=True`` (a gradient penalty, a Hessian-vector
product, a MAML-style inner step) needs gradients that are themselves
functions of the inputs. Without them autograd would take the returned
gradients as constants and silently drop the second-order terms. So each
Function's backward, when grad mode is on (which is what create_graph
means there), recomputes the plain composition it replaces from its saved
inputs and differentiates that with create_graph, as the reference model's
own ops would be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tensor = torch.Tensor


def grads_with_graph(
    composition: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    needs: Sequence[bool],
    grad: Tensor,
) -> list[Tensor | None]:
    """The gradients of ``composition(*inputs)`` (the plain ops a Function
    replaces) with respect to ``inputs``, contracted with ``grad``, as a graph
    autograd can differentiate again; None where ``needs``
    (ctx.needs_input_grad) says no.

    The composition runs on an alias of each input (``view_as``: the same
    values, a graph node of its own). Differentiated with respect to the
    inputs themselves, autograd would also count the paths from one input
    through another computed from it (the last layer's q, k and v come from
    its input x): the returned gradient of x must hold only the paths through
    the composition's own uses of x, as the Function's plain backward does.
    """
    aliases = [t.view_as(t) for t in inputs]
    wanted = [t for t, need in zip(aliases, needs, strict=True) if need]
    output = composition(*aliases)
    found = iter(torch.autograd.grad(output, wanted, grad, create_graph=True, allow_unused=True))
    return [next(found) if need else None for need in needs]


def refuse_create_graph(op: str) -> None:
    """A clear error for a backward with create_graph through ``op``, a
    Triton add & norm: its backward kernel writes gradients from the saved
    sum and masks, not from the inputs, so there is no composition to
    recompute. (Only eager calls get here: a compiled training step has no
    double backward at all, torch.compile's own limit.)"""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op} (the Triton add & norm) has no double backward (create_graph=True); "
            "for gradients of gradients use FastOptions(norm='torch'), which runs "
            "PyTorch's ops"
        )
