"""The ReLU feed-forward block (linear1 -> relu -> linear2) in eager kernels
that write two fewer (tokens, d_mlp) tensors: the fast path's MLP where nothing
is compiled (the CPU training step).

Autograd's composition allocates the ReLU's output and the ReLU's gradient as
fresh tensors. Here the ReLU runs in place on linear1's output (nothing else
needs the pre-activation: ReLU's backward reads its output) and its gradient
masks linear2's input gradient in place. On 2 CPU cores a fresh 8 MB tensor
costs several times what a reused one does (page faults, cache misses):
measured at the CPU benchmark shape, the training step is 3-5% faster.
Small blocks take the composition: there, a Python autograd.Function's
overhead (tens of microseconds per call each way) costs more than the saved
allocations (measured: fwd+bwd 0.95-1.0x below 2^18 hidden elements, 1.01-1.2x
from 2^20 up).

Backward uses the products autograd uses for addmm and relu (e.g. a
weight's gradient as ``grad.t() @ input``), so on the CPU the gradients equal
the composition's bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wmfast import backends
from wmfast.ops._create_graph import grads_with_graph

Tensor = torch.Tensor

# tokens * d_mlp from which the in-place kernels run (4 MiB of fp32 activation)
MIN_FUSED_HIDDEN = 2**20


class _ReluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, d_model)
        hidden = torch.addmm(b1, x2, w1.t()).relu_()  # (tokens, d_mlp)
        out = torch.addmm(b2, hidden, w2.t())  # (tokens, d_model)
        # x and the biases only for a backward with create_graph
        ctx.save_for_backward(x2, hidden, x, w1, b1, w2, b2)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x2, hidden, *inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: wmfast.ops._create_graph
            return tuple(grads_with_graph(_composition, inputs, ctx.needs_input_grad, grad_out))
        _, w1, _, w2, _ = inputs
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])
        d_w2 = g.t().mm(hidden) if need_w2 else None
        d_b2 = g.sum(0) if need_b2 else None
        d_x = d_w1 = d_b1 = None
        if need_x or need_w1 or need_b1:
            d_hidden = g.mm(w2)
            # ReLU's backward, in place: zero where its output is not positive
            torch.ops.aten.threshold_backward.grad_input(d_hidden, hidden, 0, grad_input=d_hidden)
            d_w1 = d_hidden.t().mm(x2) if need_w1 else None
            d_b1 = d_hidden.sum(0) if need_b1 else None
            if need_x:
                d_x = d_hidden.mm(w1).view(*grad_out.shape[:-1], w1.shape[-1])
        return d_x, d_w1, d_b1, d_w2, d_b2


def relu_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """``F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)``; x: (..., d_model).

    Runs the in-place kernels when the hidden activation has at least
    MIN_FUSED_HIDDEN elements, all tensors share a dtype and device, and
    ``backends.eager_functions_allowed`` (no torch.compile, torch.func
    transform or autocast); otherwise the composition.
    """
    tensors = (x, w1, b1, w2, b2)
    fused = (
        backends.eager_functions_allowed(x.device.type)
        and x.numel() // max(x.shape[-1], 1) * w1.shape[0] >= MIN_FUSED_HIDDEN
        and len({t.dtype for t in tensors}) == 1
        and len({t.device for t in tensors}) == 1
    )
    if not fused:
        return _composition(x, w1, b1, w2, b2)
    return _ReluMLP.apply(x, w1, b1, w2, b2)


def _composition(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)
