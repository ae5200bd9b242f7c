"""torch ops around the Triton dropout + add + LayerNorm kernels: autograd, fake
kernels and the functional API. Importing this module imports triton.

The chain: Triton kernels and launchers (``wmfast.kernels.layer_norm``) ->
torch ops with autograd (here) -> functional API ``dropout_add_layer_norm``
(here) -> the fast transformer's forward (``transformer_functional``, with
``FastOptions(norm="triton")``). The pure-torch reference of the same math is
``transformer_functional.torch_add_norm``.

As for the rotary ops (wmfast.ops.rotary), each op is registered twice: a
``triton_op`` that torch.compile sees into on CUDA, and an opaque
``custom_op`` for CPU tensors under the Triton interpreter; eager calls on
plain tensors skip both through a plain autograd.Function around the same
launchers (wmfast.ops._eager).
"""

from __future__ import annotations

import torch
from torch.library import custom_op, triton_op, wrap_triton

from wmfast.kernels._triton import no_wrap
from wmfast.kernels.layer_norm import (
    check_dropout_add_layer_norm,
    dropout_add_layer_norm_bwd_launch,
    dropout_add_layer_norm_fwd_launch,
)
from wmfast.ops._create_graph import refuse_create_graph
from wmfast.ops._eager import launch_eagerly, records_grad

Tensor = torch.Tensor


def _empty(x: Tensor, dtype: torch.dtype, wanted: bool = True) -> Tensor:
    """A new contiguous tensor shaped like x, or an empty placeholder when not
    wanted (an op returns a fixed number of tensors)."""
    return torch.empty(x.shape if wanted else (0,), dtype=dtype, device=x.device)


def norm_output_dtype(device_type: str, x_dtype: torch.dtype, y_dtype: torch.dtype):
    """The dtype of ``F.layer_norm(x + y)``: fp32 under CUDA's autocast, which
    runs layer_norm in fp32; CPU's autocast leaves layer_norm alone, so there
    (and without autocast) the sum's dtype."""
    if device_type != "cpu" and torch.is_autocast_enabled(device_type):
        return torch.float32
    return torch.promote_types(x_dtype, y_dtype)


def _forward_outputs(x, y, seed, p, out_dtype, low_dtype, save):
    """(out, low, s, keep): the forward's outputs; placeholders for what is not needed."""
    dropout = seed is not None and p > 0
    return (
        _empty(x, out_dtype),
        _empty(x, low_dtype or out_dtype, low_dtype is not None),
        _empty(x, torch.promote_types(x.dtype, y.dtype), save),
        _empty(x, torch.bool, save and dropout),
    )


def _forward_impl(x, y, weight, bias, seed, p, eps, out_dtype, low_dtype, save, wrap):
    out, low, s, keep = _forward_outputs(x, y, seed, p, out_dtype, low_dtype, save)
    dropout = seed is not None and p > 0
    dropout_add_layer_norm_fwd_launch(
        x, y, weight, bias, seed, p, eps,
        out=out,
        low=low if low_dtype is not None else None,
        s=s if save else None,
        # without a backward the mask is still drawn; it only needs a place
        keep=(keep if save else _empty(x, torch.bool)) if dropout else None,
        wrap=wrap,
    )  # fmt: skip
    return out, low, s, keep


@custom_op("wmfast::dropout_add_layer_norm", mutates_args=())
def _forward_opaque(
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    seed: Tensor | None,
    p: float,
    eps: float,
    out_dtype: torch.dtype,
    low_dtype: torch.dtype | None,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(x, y, weight, bias, seed, p, eps, out_dtype, low_dtype, save, no_wrap)


@_forward_opaque.register_fake
def _(x, y, weight, bias, seed, p, eps, out_dtype, low_dtype, save):
    return _forward_outputs(x, y, seed, p, out_dtype, low_dtype, save)


@triton_op("wmfast::dropout_add_layer_norm_traceable", mutates_args=())
def _forward_traceable(
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    seed: Tensor | None,
    p: float,
    eps: float,
    out_dtype: torch.dtype,
    low_dtype: torch.dtype | None,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(x, y, weight, bias, seed, p, eps, out_dtype, low_dtype, save, wrap_triton)


def _backward_impl(d_out, d_low, s, keep, weight, p, eps, x_dtype, y_dtype, wrap):
    d_x, d_y = _empty(s, x_dtype), _empty(s, y_dtype)
    d_w, d_b = dropout_add_layer_norm_bwd_launch(
        d_out, d_low, s, keep if keep.numel() else None, weight, p, eps, d_x, d_y, wrap=wrap
    )
    return d_x, d_y, d_w, d_b


@custom_op("wmfast::dropout_add_layer_norm_backward", mutates_args=())
def _backward_opaque(
    d_out: Tensor | None,
    d_low: Tensor | None,
    s: Tensor,
    keep: Tensor,
    weight: Tensor,
    p: float,
    eps: float,
    x_dtype: torch.dtype,
    y_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(d_out, d_low, s, keep, weight, p, eps, x_dtype, y_dtype, no_wrap)


@_backward_opaque.register_fake
def _(d_out, d_low, s, keep, weight, p, eps, x_dtype, y_dtype):
    d_w = torch.empty(s.shape[-1], dtype=torch.float32, device=s.device)
    return _empty(s, x_dtype), _empty(s, y_dtype), d_w, torch.empty_like(d_w)


@triton_op("wmfast::dropout_add_layer_norm_backward_traceable", mutates_args=())
def _backward_traceable(
    d_out: Tensor | None,
    d_low: Tensor | None,
    s: Tensor,
    keep: Tensor,
    weight: Tensor,
    p: float,
    eps: float,
    x_dtype: torch.dtype,
    y_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(d_out, d_low, s, keep, weight, p, eps, x_dtype, y_dtype, wrap_triton)


def _setup(ctx, inputs, output):
    x, y, weight, bias, seed, p, eps, out_dtype, low_dtype, save = inputs
    _, _, s, keep = output
    if not save:
        raise RuntimeError(
            "dropout_add_layer_norm ran with save=False but autograd needs its backward: "
            "call it through wmfast.ops.layer_norm.dropout_add_layer_norm"
        )
    ctx.save_for_backward(s, keep, weight)
    ctx.args = (p, eps, x.dtype, y.dtype, weight.dtype, bias.dtype)
    # an unused output (low, when the caller does not take it) gets None, not zeros
    ctx.set_materialize_grads(False)


def _backward(ctx, d_out, d_low, _d_s, _d_keep):
    refuse_create_graph("wmfast.ops.dropout_add_layer_norm")
    s, keep, weight = ctx.saved_tensors
    p, eps, x_dtype, y_dtype, w_dtype, b_dtype = ctx.args
    args = (d_out, d_low, s, keep, weight, p, eps, x_dtype, y_dtype)
    if launch_eagerly(*(t for t in args[:5] if t is not None)):
        d_x, d_y, d_w, d_b = _backward_impl(*args, no_wrap)
    else:
        backward = _backward_traceable if s.is_cuda else _backward_opaque
        d_x, d_y, d_w, d_b = backward(*args)
    return d_x, d_y, d_w.to(w_dtype), d_b.to(b_dtype), None, None, None, None, None, None


for _op in (_forward_opaque, _forward_traceable):
    _op.register_autograd(_backward, setup_context=_setup)


class _DropoutAddLayerNormEager(torch.autograd.Function):
    """The forward op outside torch.compile: the same launcher, setup and
    backward without torch.library's dispatch."""

    @staticmethod
    def forward(ctx, x, y, weight, bias, seed, p, eps, out_dtype, low_dtype, save):
        inputs = (x, y, weight, bias, seed, p, eps, out_dtype, low_dtype, save)
        outputs = _forward_impl(*inputs, no_wrap)  # the launcher checks the inputs
        ctx.mark_non_differentiable(*outputs[2:])  # s and keep: for the backward only
        if save:
            _setup(ctx, inputs, outputs)
        return outputs

    backward = staticmethod(_backward)


def dropout_add_layer_norm(
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    p: float = 0.0,
    training: bool = False,
    low_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``layer_norm(x + dropout(y, p, training))`` over the last dim, with the
    Triton kernels; returns ``(out, low)``, where ``low`` is ``out`` in
    ``low_dtype`` (written by the same pass) or ``out`` itself when
    ``low_dtype`` is None or out's dtype.

    Dtypes follow the composition it replaces: ``x + y`` in their promoted
    dtype, the norm's output in that dtype, or fp32 under CUDA's autocast
    (``norm_output_dtype``). Dropout masks come from Triton's Philox stream,
    seeded from torch's generator on x's device: the same distribution as
    F.dropout, not its masks. Differentiable in x, y, weight and bias.
    """
    eager = launch_eagerly(x, y, weight, bias)
    if not eager:  # before dispatch: the same error under torch.compile (eager: the launcher's)
        check_dropout_add_layer_norm(x, y, weight, bias, p)
    dropout = training and p > 0
    out_dtype = norm_output_dtype(x.device.type, x.dtype, y.dtype)
    if low_dtype == out_dtype:
        low_dtype = None
    seed = torch.randint(2**62, (1,), device=x.device) if dropout else None
    save = records_grad(x, y, weight, bias)
    args = (x, y, weight, bias, seed, p if dropout else 0.0, eps, out_dtype, low_dtype, save)
    if not eager:
        out, low, _, _ = (_forward_traceable if x.is_cuda else _forward_opaque)(*args)
    elif save:
        out, low, _, _ = _DropoutAddLayerNormEager.apply(*args)
    else:  # nothing to record for autograd (no_grad): the launcher alone
        out, low, _, _ = _forward_impl(*args, no_wrap)
    return out, (low if low_dtype is not None else out)
