"""torch ops around the Triton kernels for an encoder layer's two add & norms at
d_mlp 0: autograd, fake kernels and the functional API. Importing this module
imports triton.

The chain: Triton kernels and launchers (``wmfast.kernels.bias_ffn_norms``) ->
torch ops with autograd (here) -> functional API ``bias_ffn_norms`` (here) ->
the fast transformer's forward (``transformer_functional``, where the norm
rule picks the Triton add & norm and the layer has d_mlp 0). The pure-torch
reference of the same math is two ``torch_add_norm`` around
``bias_only_ffn``.

Bytes per position each way, d_model 512, bf16 autocast (fp32 residual,
bf16 attention output, 1-byte masks), against two dropout_add_layer_norm
passes: forward reads x and y (6 B per feature) and writes the first sum,
both masks, the output and its bf16 copy (4 + 2 + 4 + 2 = 12), 18 B against
30 (the single kernels also write norm1's output and the second sum, and read
norm1's output back); backward reads the output's two gradients, the sum and
both masks (4 + 2 + 4 + 2 = 12) and writes x's and y's gradients (6), 18 B
against 34 (norm1's output gradient written and read back, the second sum,
c's gradient over every position and its reduction).

Registered twice, as the other ops (wmfast.ops.layer_norm): a ``triton_op``
torch.compile sees into on CUDA, an opaque ``custom_op`` for CPU tensors under
the Triton interpreter; eager calls on plain tensors use a plain
autograd.Function around the same launchers.
"""

from __future__ import annotations

import torch
from torch.library import custom_op, triton_op, wrap_triton

from wmfast.kernels._triton import no_wrap
from wmfast.kernels.bias_ffn_norms import (
    PARAM_GRADS,
    bias_ffn_norms_bwd_launch,
    bias_ffn_norms_fwd_launch,
    check_bias_ffn_norms,
)
from wmfast.ops._create_graph import refuse_create_graph
from wmfast.ops._eager import launch_eagerly, records_grad
from wmfast.ops.layer_norm import _empty, dropout_add_layer_norm, norm_output_dtype

Tensor = torch.Tensor


def _forward_outputs(x, seeds, p, out_dtype, low_dtype, save):
    """(out, low, s, keep1, keep2); placeholders for what is not needed."""
    dropout = seeds is not None and p > 0
    masks = save and dropout
    return (
        _empty(x, out_dtype),
        _empty(x, low_dtype or out_dtype, low_dtype is not None),
        _empty(x, out_dtype, save),  # the first sum, in the output's dtype (checked)
        _empty(x, torch.bool, masks),
        _empty(x, torch.bool, masks),
    )


def _forward_impl(x, y, w1, b1, c, w2, b2, seeds, p, eps, out_dtype, low_dtype, save, wrap):
    out, low, s, keep1, keep2 = _forward_outputs(x, seeds, p, out_dtype, low_dtype, save)
    dropout = seeds is not None and p > 0
    # without a backward the masks are still drawn; they only need a place
    masks = (keep1, keep2) if save else (_empty(x, torch.bool), _empty(x, torch.bool))
    bias_ffn_norms_fwd_launch(
        x, y, w1, b1, c, w2, b2, seeds, p, eps,
        out=out,
        low=low if low_dtype is not None else None,
        s=s if save else None,
        keep1=masks[0] if dropout else None,
        keep2=masks[1] if dropout else None,
        wrap=wrap,
    )  # fmt: skip
    return out, low, s, keep1, keep2


@custom_op("wmfast::bias_ffn_norms", mutates_args=())
def _forward_opaque(
    x: Tensor,
    y: Tensor,
    w1: Tensor,
    b1: Tensor,
    c: Tensor,
    w2: Tensor,
    b2: Tensor,
    seeds: Tensor | None,
    p: float,
    eps: float,
    out_dtype: torch.dtype,
    low_dtype: torch.dtype | None,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(
        x, y, w1, b1, c, w2, b2, seeds, p, eps, out_dtype, low_dtype, save, no_wrap
    )


@_forward_opaque.register_fake
def _(x, y, w1, b1, c, w2, b2, seeds, p, eps, out_dtype, low_dtype, save):
    return _forward_outputs(x, seeds, p, out_dtype, low_dtype, save)


@triton_op("wmfast::bias_ffn_norms_traceable", mutates_args=())
def _forward_traceable(
    x: Tensor,
    y: Tensor,
    w1: Tensor,
    b1: Tensor,
    c: Tensor,
    w2: Tensor,
    b2: Tensor,
    seeds: Tensor | None,
    p: float,
    eps: float,
    out_dtype: torch.dtype,
    low_dtype: torch.dtype | None,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(
        x, y, w1, b1, c, w2, b2, seeds, p, eps, out_dtype, low_dtype, save, wrap_triton
    )


def _backward_impl(d_out, d_low, s, keep1, keep2, w1, b1, c, w2, p, eps, x_dtype, y_dtype, wrap):
    d_x, d_y = _empty(s, x_dtype), _empty(s, y_dtype)
    masks = (keep1, keep2) if keep1.numel() else (None, None)
    grads = bias_ffn_norms_bwd_launch(
        d_out, d_low, s, *masks, w1, b1, c, w2, p, eps, d_x, d_y, wrap=wrap
    )
    return d_x, d_y, grads


@custom_op("wmfast::bias_ffn_norms_backward", mutates_args=())
def _backward_opaque(
    d_out: Tensor | None,
    d_low: Tensor | None,
    s: Tensor,
    keep1: Tensor,
    keep2: Tensor,
    w1: Tensor,
    b1: Tensor,
    c: Tensor,
    w2: Tensor,
    p: float,
    eps: float,
    x_dtype: torch.dtype,
    y_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(
        d_out, d_low, s, keep1, keep2, w1, b1, c, w2, p, eps, x_dtype, y_dtype, no_wrap
    )


@_backward_opaque.register_fake
def _(d_out, d_low, s, keep1, keep2, w1, b1, c, w2, p, eps, x_dtype, y_dtype):
    grads = torch.empty(len(PARAM_GRADS), s.shape[-1], dtype=torch.float32, device=s.device)
    return _empty(s, x_dtype), _empty(s, y_dtype), grads


@triton_op("wmfast::bias_ffn_norms_backward_traceable", mutates_args=())
def _backward_traceable(
    d_out: Tensor | None,
    d_low: Tensor | None,
    s: Tensor,
    keep1: Tensor,
    keep2: Tensor,
    w1: Tensor,
    b1: Tensor,
    c: Tensor,
    w2: Tensor,
    p: float,
    eps: float,
    x_dtype: torch.dtype,
    y_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(
        d_out, d_low, s, keep1, keep2, w1, b1, c, w2, p, eps, x_dtype, y_dtype, wrap_triton
    )


def _setup(ctx, inputs, output):
    x, y, w1, b1, c, w2, b2, seeds, p, eps, out_dtype, low_dtype, save = inputs
    _, _, s, keep1, keep2 = output
    if not save:
        raise RuntimeError(
            "bias_ffn_norms ran with save=False but autograd needs its backward: call it "
            "through wmfast.ops.bias_ffn_norms.bias_ffn_norms"
        )
    ctx.save_for_backward(s, keep1, keep2, w1, b1, c, w2)
    ctx.args = (p, eps, x.dtype, y.dtype)
    ctx.param_dtypes = (w1.dtype, b1.dtype, c.dtype, w2.dtype, b2.dtype)
    ctx.set_materialize_grads(False)  # an unused low copy gets None, not zeros


def _backward(ctx, d_out, d_low, _d_s, _d_keep1, _d_keep2):
    refuse_create_graph("wmfast.ops.bias_ffn_norms")
    s, keep1, keep2, w1, b1, c, w2 = ctx.saved_tensors
    args = (d_out, d_low, s, keep1, keep2, w1, b1, c, w2, *ctx.args)
    tensors = [t for t in args[:9] if t is not None]
    if launch_eagerly(*tensors):
        d_x, d_y, grads = _backward_impl(*args, no_wrap)
    else:
        backward = _backward_traceable if s.is_cuda else _backward_opaque
        d_x, d_y, grads = backward(*args)
    # c's gradient: summed in fp32, rounded once to c's dtype, as the sum over
    # the positions of its dtype's gradients would be
    d_w1, d_b1, d_c, d_w2, d_b2 = (
        g.to(dtype) for g, dtype in zip(grads.unbind(0), ctx.param_dtypes, strict=True)
    )
    return d_x, d_y, d_w1, d_b1, d_c, d_w2, d_b2, None, None, None, None, None, None


for _op in (_forward_opaque, _forward_traceable):
    _op.register_autograd(_backward, setup_context=_setup)


class _BiasFfnNormsEager(torch.autograd.Function):
    """The forward op outside torch.compile: the same launcher, setup and
    backward without torch.library's dispatch."""

    @staticmethod
    def forward(ctx, x, y, w1, b1, c, w2, b2, seeds, p, eps, out_dtype, low_dtype, save):
        inputs = (x, y, w1, b1, c, w2, b2, seeds, p, eps, out_dtype, low_dtype, save)
        outputs = _forward_impl(*inputs, no_wrap)  # the launcher checks the inputs
        ctx.mark_non_differentiable(*outputs[2:])  # s and the masks: for the backward only
        if save:
            _setup(ctx, inputs, outputs)
        return outputs

    backward = staticmethod(_backward)


def bias_ffn_norms(
    x: Tensor,
    y: Tensor,
    norm1_weight: Tensor,
    norm1_bias: Tensor,
    ffn_bias: Tensor,
    norm2_weight: Tensor,
    norm2_bias: Tensor,
    eps: float,
    p: float = 0.0,
    training: bool = False,
    low_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``norm2(norm1(x + dropout(y)) + dropout(ffn_bias))``: a post-LN encoder
    layer's two add & norms at d_mlp 0, where the feed-forward block's output
    is ``ffn_bias`` (d,) at every position. Returns ``(out, low)`` as
    ``dropout_add_layer_norm`` does, with the same dtype rules; where those
    would round norm1's output or a sum to another dtype than the output's
    (a bf16 model under CUDA's autocast), it runs as two ``dropout_add_layer_norm``.
    Dropout masks: Triton's Philox stream, seeded from torch's generator (the
    distribution of F.dropout, not its masks). Differentiable in every tensor.
    """
    out_dtype = norm_output_dtype(x.device.type, x.dtype, y.dtype)
    if torch.promote_types(x.dtype, y.dtype) != out_dtype or (
        torch.promote_types(out_dtype, ffn_bias.dtype) != out_dtype
    ):
        mid, _ = dropout_add_layer_norm(x, y, norm1_weight, norm1_bias, eps, p, training)
        ffn = ffn_bias.expand(mid.shape)
        return dropout_add_layer_norm(
            mid, ffn, norm2_weight, norm2_bias, eps, p, training, low_dtype
        )
    params = (norm1_weight, norm1_bias, ffn_bias, norm2_weight, norm2_bias)
    eager = launch_eagerly(x, y, *params)
    if not eager:  # before dispatch: the same error under torch.compile
        check_bias_ffn_norms(x, y, *params, p, out_dtype)
    dropout = training and p > 0
    if low_dtype == out_dtype:
        low_dtype = None
    seeds = torch.randint(2**62, (2,), device=x.device) if dropout else None
    save = records_grad(x, y, *params)
    args = (x, y, *params, seeds, p if dropout else 0.0, eps, out_dtype, low_dtype, save)
    if not eager:
        out, low, *_ = (_forward_traceable if x.is_cuda else _forward_opaque)(*args)
    elif save:
        out, low, *_ = _BiasFfnNormsEager.apply(*args)
    else:  # nothing to record for autograd (no_grad): the launcher alone
        out, low, *_ = _forward_impl(*args, no_wrap)
    return out, (low if low_dtype is not None else out)
