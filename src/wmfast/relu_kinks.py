"""ReLU kinks: why two correct models can disagree on a gradient, and how
``wmfast check`` tells that apart from a wrong one.

A ReLU's derivative jumps from 0 to 1 at zero. Where the reference computes a
ReLU input within rounding of zero, a candidate that computes the same
function with other rounding (a fused kernel, another summation order) may
land on the other side. Its forward then differs by less than the rounding,
but one element of the gradient at that ReLU is the whole upstream gradient
on one side and 0 on the other, and every gradient below it moves by that
term. For ``wmfast check``'s default "rotary" model and inputs, one ReLU input
of layer 0 is 2.2e-8 from zero; on an H100 the Triton embedding rotation
landed on the other side and linear1's weight gradient moved by 0.11
(bench/results/README.md, "h100-3"). Neither gradient is wrong: each is the
derivative of one side.

So when gradients fail, the check (and the tests' gradient comparisons) ask
whether flips at such kinks explain the gap (``explain_gap``):

1. ``near_kinks``: the reference's ReLU inputs within ``margin`` of zero (the
   check's activation atol, relative to the layer's largest input), nearest
   first. The ReLUs are those of the encoder layers' feed-forward blocks,
   whose input is ``linear1``'s output (the recurrent models' candidates run
   the reference's own modules: nothing to flip there).
2. For each, the reference's gradients with that one ReLU taken on its other
   side (``flipped``: the input's sign changes, its gradient passes through
   unchanged, so only the ReLU's branch changes). The backward is linear in
   which ReLUs are on, so the flips' effects on the gradients add.
3. Least squares for the candidate's gap as a sum of those effects, each
   weight rounded to 0 or 1: the set of flips the candidate most likely took.
4. The reference rerun with that set flipped; the candidate must match it at
   the usual tolerances. A wrong gradient is not a sum of a few flips'
   effects, so it still fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

# the most kinks tried (nearest to zero first): each costs one backward of the reference
MAX_KINKS = 16

Grads = dict[str, "torch.Tensor | None"]


@dataclasses.dataclass(frozen=True)
class Kink:
    path: str  # the Linear whose output is the ReLU's input, e.g. "transformer_encoder.layers.0.linear1"
    index: tuple[int, ...]  # the element of that output
    value: float  # the reference's ReLU input there


def relu_inputs(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears whose outputs feed a ReLU, by module path: ``linear1`` of
    every encoder layer with activation "relu" and d_mlp > 0."""
    return {
        f"{name}.linear1": layer.linear1
        for name, layer in model.named_modules()
        if isinstance(layer, nn.TransformerEncoderLayer)
        and getattr(layer, "activation_relu_or_gelu", 0) == 1
        and layer.linear1.out_features > 0
    }


def near_kinks(
    model: nn.Module, forward: Callable[[], object], margin: float, limit: int = MAX_KINKS
) -> tuple[list[Kink], int]:
    """The ReLU inputs that ``forward()`` (a call of ``model``) computes within
    ``margin * max(1, largest |input| of the layer)`` of zero: the nearest
    ``limit`` of them, and how many there are in all."""
    inputs: dict[str, torch.Tensor] = {}

    def record(path):
        def hook(module, args, out):
            inputs.setdefault(path, out.detach())  # returns None: the output stays as it is

        return hook

    handles = [linear.register_forward_hook(record(p)) for p, linear in relu_inputs(model).items()]
    try:
        forward()  # in the caller's grad mode: without grad, an eval-mode encoder
        # takes PyTorch's fused path, which calls no linear1
    finally:
        for handle in handles:
            handle.remove()
    found: list[tuple[float, str, tuple[int, ...]]] = []
    total = 0
    for path, values in inputs.items():
        size = values.abs().float()
        close = size <= margin * max(1.0, float(size.max()))
        total += int(close.sum())
        # only this layer's nearest `limit` can be among the nearest overall
        nearest = torch.topk(size[close], min(limit, int(close.sum())), largest=False).indices
        for row in torch.nonzero(close)[nearest].tolist():
            index = tuple(row)
            found.append((abs(float(values[index])), path, index))
    found.sort()
    kinks = [Kink(path, index, float(inputs[path][index])) for _, path, index in found[:limit]]
    return kinks, total


def _flip_hook(kinks: Sequence[Kink]):
    def hook(module, args, out):
        # one index tensor per dimension: (b...), (t...), (unit...)
        columns = zip(*(k.index for k in kinks), strict=True)
        index = tuple(torch.tensor(c, device=out.device) for c in columns)
        value = out.detach()[index]
        # the other side of zero at the same distance (0 itself goes to the
        # smallest positive number: PyTorch's ReLU passes no gradient at 0);
        # added as a constant, so the gradient through `out` is unchanged
        tiny = torch.finfo(out.dtype).tiny
        other = torch.where(value > 0, -value, value.abs().clamp_min(tiny))
        shift = torch.zeros_like(out).index_put(index, other - value)
        return out + shift

    return hook


@contextlib.contextmanager
def flipped(model: nn.Module, kinks: Sequence[Kink]) -> Iterator[None]:
    """``model`` with each of ``kinks``' ReLU inputs taken on its other side of zero."""
    linears = relu_inputs(model)
    by_path: dict[str, list[Kink]] = {}
    for kink in kinks:
        by_path.setdefault(kink.path, []).append(kink)
    handles = [linears[path].register_forward_hook(_flip_hook(ks)) for path, ks in by_path.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _flat(grads: Grads, names: Sequence[str]) -> torch.Tensor:
    return torch.cat([grads[n].detach().double().flatten().cpu() for n in names])


def likely_flips(
    reference_grads: Callable[[Sequence[Kink]], Grads],
    base: Grads,
    got: Grads,
    kinks: Sequence[Kink],
    names: Sequence[str],
) -> list[Kink]:
    """The subset of ``kinks`` whose flips best explain ``got - base`` on the
    parameters ``names`` (steps 2 and 3 of the module docstring)."""
    gap = _flat(got, names) - _flat(base, names)
    effects = torch.stack(
        [_flat(reference_grads([kink]), names) - _flat(base, names) for kink in kinks], dim=1
    )  # (elements, kinks)
    weights = torch.linalg.lstsq(effects, gap[:, None]).solution.flatten()
    return [kink for kink, w in zip(kinks, weights.tolist(), strict=True) if w > 0.5]


@dataclasses.dataclass
class Explanation:
    """What ``explain_gap`` found: the kinks it tried (the nearest), how many
    lie within the margin in all, the flips that best explain the gap, and the
    model's gradients with those flips taken (None when there are none)."""

    kinks: list[Kink]
    total: int
    flips: list[Kink]
    grads: Grads | None


def explain_gap(
    model: nn.Module,
    forward: Callable[[], object],
    grads: Callable[[], Grads],
    want: Grads,
    got: Grads,
    names: Sequence[str],
    margin: float,
) -> Explanation:
    """Steps 1 to 4 of the module docstring for a gap between ``got`` and
    ``want`` (``grads()``'s result: ``model``'s gradients by name) on the
    parameters ``names``; ``forward()`` runs ``model`` as ``grads()`` does.
    Whether the flipped gradients match ``got`` is the caller's judgement."""
    kinks, total = near_kinks(model, forward, margin)
    if not kinks or not names:
        return Explanation(kinks, total, [], None)

    def flipped_grads(flips: Sequence[Kink]) -> Grads:
        with flipped(model, flips):
            return grads()

    flips = likely_flips(flipped_grads, want, got, kinks, names)
    return Explanation(kinks, total, flips, flipped_grads(flips) if flips else None)
