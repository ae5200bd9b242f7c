"""torch ops around the Triton rotary kernels: autograd, fake kernels, and the
functional API. Importing this module imports triton (wmfast.kernels).

The chain, per op: Triton kernel and launcher (``wmfast.kernels.rotary``) ->
torch op with autograd (here) -> functional API (``rotary_qk``,
``rotary_qkv_packed``, ``rotary_qk_packed_``, ``embedding_rotation``, here) ->
nn.Module (the models). ``rotary_qkv_packed`` is an autograd.Function rather
than a registered op, because it returns v as a view of its input (a
registered op's outputs may not alias its inputs); its forward and backward
call registered ops.
The pure-torch reference of the same math is ``wmfast.functional``.

Each op is registered twice, because torch.compile needs different wrappers
per device (measured with torch 2.13, triton 3.9):

* ``wmfast::*_traceable``, a ``torch.library.triton_op`` launching through
  ``wrap_triton``: Inductor sees the kernel (CUDA tensors). Under
  torch.compile on CPU tensors it fails ("Cannot access data pointer of
  Tensor ... FakeTensor").
* ``wmfast::*``, an opaque ``torch.library.custom_op`` with a fake kernel:
  compiles with no graph break everywhere, so it is the CPU (interpreter) op.

The functional API picks by a fixed rule: eager calls on plain tensors -> a
plain autograd.Function around the same launcher (wmfast.ops._eager: the
registered ops' dispatch costs more host time than the kernels at small
sizes); otherwise CUDA tensors -> traceable op, other tensors -> opaque op.
Backward rotates by the negative angle through the same functional API.
"""

from __future__ import annotations

import torch
from torch.library import custom_op, triton_op, wrap_triton

from wmfast.kernels._triton import no_wrap
from wmfast.kernels.rotary import (
    check_embedding_rotation,
    check_rotary_qk,
    embedding_rotation_launch,
    rotary_qk_launch,
    rotary_qk_packed_grad_launch,
)
from wmfast.ops._eager import launch_eagerly, records_grad

Tensor = torch.Tensor


def _new(x: Tensor) -> Tensor:
    """A contiguous tensor shaped like x (the ops' outputs never alias inputs)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# -- rotary_qk: RoPE on q and k, out of place ----------------------------------------


def _rotary_qk_impl(q, k, cos, sin, conj, wrap) -> tuple[Tensor, Tensor]:
    q_out, k_out = _new(q), _new(k)
    rotary_qk_launch(q, k, cos, sin, q_out, k_out, conj=conj, wrap=wrap)
    return q_out, k_out


@custom_op("wmfast::rotary_qk", mutates_args=())
def _rotary_qk_opaque(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, conj: bool
) -> tuple[Tensor, Tensor]:
    return _rotary_qk_impl(q, k, cos, sin, conj, no_wrap)


@_rotary_qk_opaque.register_fake
def _(q, k, cos, sin, conj):
    return _new(q), _new(k)


@triton_op("wmfast::rotary_qk_traceable", mutates_args=())
def _rotary_qk_traceable(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, conj: bool
) -> tuple[Tensor, Tensor]:
    return _rotary_qk_impl(q, k, cos, sin, conj, wrap_triton)


def _rotary_qk_op(q: Tensor):
    return _rotary_qk_traceable if q.is_cuda else _rotary_qk_opaque


def _table_grads(grads, inputs, conj) -> tuple[Tensor, Tensor]:
    """Per-element d loss / d (cos, sin) of rotations ``o1 = x1 c - x2 s, o2 = x2 c + x1 s``,
    summed over the (grad, input) pairs; the caller reduces them to the tables' shape.

    Rarely needed (the tables come from a buffer), but an nnsight user may take
    gradients through an edited pos_encoder output. Pure torch, fp32.
    """
    d_cos = d_sin = 0
    for g, x in zip(grads, inputs, strict=True):
        g1, g2 = g.float().chunk(2, dim=-1)
        x1, x2 = x.float().chunk(2, dim=-1)
        d_cos = d_cos + (g1 * x1 + g2 * x2)
        d_sin = d_sin + (g2 * x1 - g1 * x2)
    return d_cos, (-d_sin if conj else d_sin)


def _rotary_qk_setup(ctx, inputs, output):
    q, k, cos, sin, conj = inputs
    ctx.conj = conj
    ctx.table_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    # q and k are only needed for table gradients; saving them otherwise would
    # keep the whole packed projection alive until backward
    ctx.save_for_backward(cos, sin, *((q, k) if ctx.table_grads else ()))


def _qk_table_grads(grads, qk, cos, sin, conj) -> tuple[Tensor, Tensor]:
    """The tables' gradients from q's and k's (B, T, H, D) and their inputs."""
    d_cos, d_sin = _table_grads(grads, qk, conj)  # (B, T, H, D/2)
    # one angle serves every head: sum over heads, then to the table's own shape
    return d_cos.sum(-2).sum_to_size(cos.shape), d_sin.sum(-2).sum_to_size(sin.shape)


def _rotary_qk_backward(ctx, grad_q, grad_k):
    cos, sin, *qk = ctx.saved_tensors
    d_q, d_k = rotary_qk(grad_q, grad_k, cos, sin, conj=not ctx.conj)
    d_cos = d_sin = None
    if ctx.table_grads:
        d_cos, d_sin = _qk_table_grads((grad_q, grad_k), qk, cos, sin, ctx.conj)
    return d_q, d_k, d_cos, d_sin, None


for _op in (_rotary_qk_opaque, _rotary_qk_traceable):
    _op.register_autograd(_rotary_qk_backward, setup_context=_rotary_qk_setup)


class _RotaryQKEager(torch.autograd.Function):
    """rotary_qk outside torch.compile: the ops' launcher, setup and backward
    without torch.library's dispatch."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, conj):
        outputs = _rotary_qk_impl(q, k, cos, sin, conj, no_wrap)  # the launcher checks
        _rotary_qk_setup(ctx, (q, k, cos, sin, conj), outputs)
        return outputs

    backward = staticmethod(_rotary_qk_backward)


def rotary_qk(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, conj: bool = False
) -> tuple[Tensor, Tensor]:
    """RoPE on q and k (B, T, H, D) with the Triton kernel; new output tensors.

    q and k may be strided views (e.g. of the packed (B, T, 3, H, D)
    projection); cos and sin are (B, T, D/2), (1, T, D/2) or (T, D/2) fp32.
    Differentiable in q, k, cos and sin.
    """
    if launch_eagerly(q, k, cos, sin):
        if records_grad(q, k, cos, sin):
            return _RotaryQKEager.apply(q, k, cos, sin, conj)
        return _rotary_qk_impl(q, k, cos, sin, conj, no_wrap)  # e.g. in the backward
    check_rotary_qk(q, k, cos, sin)  # before dispatch: the same error under torch.compile
    return _rotary_qk_op(q)(q, k, cos, sin, conj)


# -- rotary_qk on the packed projection, with the packed gradient ----------------------


def _packed_grad_impl(d_q, d_k, d_v, cos, sin, wrap) -> Tensor:
    batch, seq_len, heads, head_dim = d_q.shape
    out = torch.empty((batch, seq_len, 3, heads, head_dim), dtype=d_q.dtype, device=d_q.device)
    rotary_qk_packed_grad_launch(d_q, d_k, d_v, cos, sin, out, wrap=wrap)
    return out


@custom_op("wmfast::rotary_qk_packed_grad", mutates_args=())
def _packed_grad_opaque(d_q: Tensor, d_k: Tensor, d_v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return _packed_grad_impl(d_q, d_k, d_v, cos, sin, no_wrap)


@_packed_grad_opaque.register_fake
def _(d_q, d_k, d_v, cos, sin):
    return d_q.new_empty((*d_q.shape[:2], 3, *d_q.shape[2:]))


@triton_op("wmfast::rotary_qk_packed_grad_traceable", mutates_args=())
def _packed_grad_traceable(
    d_q: Tensor, d_k: Tensor, d_v: Tensor, cos: Tensor, sin: Tensor
) -> Tensor:
    return _packed_grad_impl(d_q, d_k, d_v, cos, sin, wrap_triton)


def _rotary_qk_packed_grad(d_q, d_k, d_v, cos, sin) -> Tensor:
    if launch_eagerly(d_q, d_k, d_v, cos, sin):
        return _packed_grad_impl(d_q, d_k, d_v, cos, sin, no_wrap)
    check_rotary_qk(d_q, d_k, cos, sin)
    op = _packed_grad_traceable if d_q.is_cuda else _packed_grad_opaque
    return op(d_q, d_k, d_v, cos, sin)


class _RotaryQKVPacked(torch.autograd.Function):
    """q, k, v of the packed projection (B, T, 3, H, D) with q and k rotated
    (new tensors) and v a view. Its backward writes the projection's gradient
    whole in one kernel; rotary_qk's backward would write q's and k's
    separately, and autograd would then stack the three into that gradient,
    another pass over all of it (0.42 ms a layer at the SIR shape in bf16 on
    an H100: bench/results "h100-3" profile)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin):
        q, k, v = qkv.unbind(2)
        if launch_eagerly(qkv, cos, sin):
            q_rot, k_rot = _rotary_qk_impl(q, k, cos, sin, False, no_wrap)
        else:
            check_rotary_qk(q, k, cos, sin)
            q_rot, k_rot = _rotary_qk_op(q)(q, k, cos, sin, False)
        ctx.table_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        # q and k only for table gradients, as rotary_qk (_rotary_qk_setup);
        # as qkv itself, whose views here (made without grad) carry no graph
        # for a backward with create_graph
        ctx.save_for_backward(cos, sin, *((qkv,) if ctx.table_grads else ()))
        return q_rot, k_rot, v

    @staticmethod
    def backward(ctx, d_q, d_k, d_v):
        cos, sin, *qkv = ctx.saved_tensors
        qk = qkv[0].unbind(2)[:2] if qkv else ()
        if torch.is_grad_enabled():
            # create_graph=True: the packed kernel records nothing, so rotate
            # through rotary_qk, which records, and stack as autograd would
            d_qkv = torch.stack((*rotary_qk(d_q, d_k, cos, sin, conj=True), d_v), dim=2)
        else:
            d_qkv = _rotary_qk_packed_grad(d_q, d_k, d_v, cos, sin)
        d_cos = d_sin = None
        if ctx.table_grads:
            d_cos, d_sin = _qk_table_grads((d_q, d_k), qk, cos, sin, False)
        return d_qkv, d_cos, d_sin


def rotary_qkv_packed(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, k, v)`` from the packed projection qkv (B, T, 3, H, D): q and k
    rotated (new tensors, as ``rotary_qk``), v a view of qkv. The same values
    as ``qkv.unbind(2)`` then ``rotary_qk``; the backward writes qkv's
    gradient in one pass. Differentiable in qkv, cos and sin."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(
            f"qkv must be (batch, seq_len, 3, heads, head_dim); got {tuple(qkv.shape)}"
        )
    return _RotaryQKVPacked.apply(qkv, cos, sin)


# -- rotary_qk, in place on the packed projection ------------------------------------


@custom_op("wmfast::rotary_qk_packed_", mutates_args=("qkv",))
def _rotary_qk_packed_opaque(qkv: Tensor, cos: Tensor, sin: Tensor) -> None:
    rotary_qk_launch(qkv[:, :, 0], qkv[:, :, 1], cos, sin, qkv[:, :, 0], qkv[:, :, 1])


@triton_op("wmfast::rotary_qk_packed_traceable_", mutates_args=("qkv",))
def _rotary_qk_packed_traceable(qkv: Tensor, cos: Tensor, sin: Tensor) -> None:
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    rotary_qk_launch(q, k, cos, sin, q, k, wrap=wrap_triton)


def rotary_qk_packed_(qkv: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotate q = qkv[:, :, 0] and k = qkv[:, :, 1] in place; qkv: (B, T, 3, H, D).

    For paths without autograd (inference): no output is allocated at all.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(
            f"qkv must be (batch, seq_len, 3, heads, head_dim); got {tuple(qkv.shape)}"
        )
    if torch.is_grad_enabled() and qkv.requires_grad:
        raise RuntimeError(
            "rotary_qk_packed_ rotates in place and has no backward; under autograd use "
            "wmfast.ops.rotary.rotary_qk, which writes new tensors"
        )
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    if launch_eagerly(qkv, cos, sin):
        rotary_qk_launch(q, k, cos, sin, q, k)  # no autograd to record: the launcher alone
        return
    check_rotary_qk(q, k, cos, sin)
    op = _rotary_qk_packed_traceable if qkv.is_cuda else _rotary_qk_packed_opaque
    op(qkv, cos, sin)


# -- embedding rotation: workingmem's "rotary", fused with scale and residual add -----


def _embedding_rotation_impl(x, cos, sin, scale, add_input, conj, wrap) -> Tensor:
    out = _new(x)
    embedding_rotation_launch(
        x, cos, sin, out, scale=scale, add_input=add_input, conj=conj, wrap=wrap
    )
    return out


@custom_op("wmfast::embedding_rotation", mutates_args=())
def _embedding_rotation_opaque(
    x: Tensor, cos: Tensor, sin: Tensor, scale: float, add_input: bool, conj: bool
) -> Tensor:
    return _embedding_rotation_impl(x, cos, sin, scale, add_input, conj, no_wrap)


@_embedding_rotation_opaque.register_fake
def _(x, cos, sin, scale, add_input, conj):
    return _new(x)


@triton_op("wmfast::embedding_rotation_traceable", mutates_args=())
def _embedding_rotation_traceable(
    x: Tensor, cos: Tensor, sin: Tensor, scale: float, add_input: bool, conj: bool
) -> Tensor:
    return _embedding_rotation_impl(x, cos, sin, scale, add_input, conj, wrap_triton)


def _embedding_rotation_setup(ctx, inputs, output):
    x, cos, sin, scale, add_input, conj = inputs
    ctx.args = (scale, add_input, conj)
    ctx.table_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    ctx.save_for_backward(cos, sin, *((x,) if ctx.table_grads else ()))


def _embedding_rotation_backward(ctx, grad):
    cos, sin, *x = ctx.saved_tensors
    scale, add_input, conj = ctx.args
    # out = s + R s with s = scale * x, so d/dx = scale * (g + R^T g): the same
    # kernel with the angle negated
    d_x = embedding_rotation(grad, cos, sin, scale=scale, add_input=add_input, conj=not conj)
    d_cos = d_sin = None
    if ctx.table_grads:
        d_cos, d_sin = _table_grads((grad,), (x[0] * scale,), conj)  # (B, T, d/2)
        d_cos, d_sin = d_cos.sum_to_size(cos.shape), d_sin.sum_to_size(sin.shape)
    return d_x, d_cos, d_sin, None, None, None


for _op in (_embedding_rotation_opaque, _embedding_rotation_traceable):
    _op.register_autograd(_embedding_rotation_backward, setup_context=_embedding_rotation_setup)


class _EmbeddingRotationEager(torch.autograd.Function):
    """embedding_rotation outside torch.compile (see _RotaryQKEager)."""

    @staticmethod
    def forward(ctx, x, cos, sin, scale, add_input, conj):
        out = _embedding_rotation_impl(x, cos, sin, scale, add_input, conj, no_wrap)
        _embedding_rotation_setup(ctx, (x, cos, sin, scale, add_input, conj), out)
        return out

    backward = staticmethod(_embedding_rotation_backward)


def embedding_rotation(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    scale: float = 1.0,
    add_input: bool = True,
    conj: bool = False,
) -> Tensor:
    """workingmem's "rotary" with the Triton kernel: with ``s = x * scale``,
    ``s + s*cos + rotate_half(s)*sin`` (add_input) or the rotation term alone.

    x: (B, T, d_model); cos, sin: (T, d/2), (1, T, d/2) or (B, T, d/2) fp32.
    The fused form replaces ``e = embedding(ids) * sqrt(d); e + pos_encoder(e)``.
    """
    if launch_eagerly(x, cos, sin):
        if records_grad(x, cos, sin):
            return _EmbeddingRotationEager.apply(x, cos, sin, float(scale), add_input, conj)
        return _embedding_rotation_impl(x, cos, sin, float(scale), add_input, conj, no_wrap)
    check_embedding_rotation(x, cos, sin)
    op = _embedding_rotation_traceable if x.is_cuda else _embedding_rotation_opaque
    return op(x, cos, sin, float(scale), add_input, conj)
