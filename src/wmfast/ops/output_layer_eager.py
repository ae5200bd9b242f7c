"""The output layer (the unembedding, nn.Linear) with a backward over the rows
the loss reads: the RNN's and LSTM's training calls on the CPU.

workingmem's loss reads the logits at the answers (every 4th position), so
the logits' gradient is exactly zero on the other rows, and autograd's
backward of the output layer multiplies those zeros through both of its
products (the weight's gradient and the input's). Here the backward finds
the nonzero rows (``tail_eager.rows_to_compute``: all rows where most are
nonzero, or where an inf or NaN in the layer's input or weight would turn
the zeros into NaNs, as autograd's products do) and runs both products on
those rows only; the input's gradient is zero on the others, as autograd's
is. The transformers' fast path does the same inside its last layer
(wmfast.ops.tail_eager). The forward is nn.Linear's own op: the same logits.

Measured on 2 CPU cores at the CPU benchmark shape (4096 rows, 128 -> 350,
every 4th row read): the backward's two products take 8.1-8.3 ms on all
rows and 1.5 ms on the read rows; the layer's forward and backward, alternating
with F.linear's, 1.07-1.19x (smaller layers: MIN_PRODUCTS below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wmfast import backends
from wmfast.ops._create_graph import grads_with_graph
from wmfast.ops.tail_eager import rows_to_compute

Tensor = torch.Tensor

# rows * d * vocab (the multiply-adds of one of the backward's products) from
# which the Function runs: below, finding and gathering the rows and the
# Python Function cost more than the products they spare. Measured on 2 CPU
# cores, the layer's forward and backward with every 4th row read,
# alternating with F.linear: 2^22 (1024, 64 -> 64) 0.67x; 2^24-2^25 0.91-1.09x
# (1024, 256 -> 64; 2048, 128 -> 128; 4096, 64 -> 128; ...); 2^26 (4096,
# 256 -> 64; 2048, 256 -> 128) 1.14-1.21x; 1024, 256 -> 350 1.26x; 16384,
# 256 -> 350 1.42x; tiny layers (64-256 rows, 16 -> 50) 0.43-0.48x.
MIN_PRODUCTS = 2**26


def large_enough(x_numel: int, vocab: int) -> bool:
    """Whether a layer with ``x_numel`` input elements (rows x d) and ``vocab``
    outputs reaches MIN_PRODUCTS, from which ``output_layer`` takes the row
    backward."""
    return x_numel * vocab >= MIN_PRODUCTS


class _OutputLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        return F.linear(x, weight, bias)  # (..., vocab)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: wmfast.ops._create_graph
            return tuple(grads_with_graph(F.linear, (x, weight, bias), ctx.needs_input_grad, grad))
        need_x, need_weight, need_bias = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # (N, vocab)
        x2 = x.reshape(-1, x.shape[-1])  # (N, d)
        rows = rows_to_compute(g, (x2, weight))
        if rows is not None:
            g, x2 = g.index_select(0, rows), x2.index_select(0, rows)
        d_weight = g.t().mm(x2) if need_weight else None
        d_bias = g.sum(0) if need_bias else None
        d_x = None
        if need_x:
            d_x = g.mm(weight)
            if rows is not None:  # zero on the rows the loss does not read
                d_x = d_x.new_zeros(grad.shape[:-1].numel(), d_x.shape[1]).index_copy_(0, rows, d_x)
            d_x = d_x.view(x.shape)
        return d_x, d_weight, d_bias


def output_layer(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)``, x: (..., d) -> (..., vocab).

    Takes the row-sparse backward from MIN_PRODUCTS up, on CPU tensors when
    autograd records the call, there is a bias, all three share a dtype, and
    ``backends.eager_functions_allowed`` (no torch.compile, torch.func
    transform or autocast); otherwise the plain op. (On CUDA, finding the
    rows would be a host-device sync per backward.)"""
    tensors = (x, weight, bias)
    # the size last: under torch.compile (a user's own) the tests before it
    # end the test, and its comparison never becomes a guard on the sizes
    if not (
        bias is not None
        and x.device.type == weight.device.type == bias.device.type == "cpu"
        and torch.is_grad_enabled()
        and backends.eager_functions_allowed("cpu")
        and any(t.requires_grad for t in tensors)
        and x.dtype == weight.dtype == bias.dtype
        and large_enough(x.numel(), weight.shape[0])
    ):
        return F.linear(x, weight, bias)
    return _OutputLayer.apply(x, weight, bias)
