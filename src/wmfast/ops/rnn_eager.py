"""The Elman RNN (nn.RNN, tanh or relu) with its backward through time written
out: the fast RNN's training step on the CPU, where there is no cuDNN.

ATen's CPU RNN records every time step in autograd (per layer and step an
addmm, an add and the nonlinearity), and its backward walks those nodes one
by one, each taking its own share of the weight gradients: T small
(H, B) x (B, H) products for each W_hh, accumulated one after another.

Here the forward runs ATen's own RNN op one layer at a time, recording
nothing (ATen runs a stack of layers layer by layer the same way, so the
outputs equal the reference's bit for bit), and keeps each layer's output
sequence. The backward walks the steps with two kernels each (an addmm adds
the gradient that reaches h_t through step t + 1, then the nonlinearity's
own backward kernel, as autograd runs it), and then takes each weight
gradient of a layer as one product over all steps. Those products sum the
steps in another order than autograd's running sums, and the small
products may round differently from autograd's: the gradients agree within
rounding (the spec's tolerances), not bit for bit. A backward with
create_graph recomputes ATen's RNN and differentiates that instead, so
gradients of gradients work as on the reference.

Measured on 2 CPU cores, the training step (embedding, RNN, output layer,
cross-entropy at every 4th position, AdamW), alternating with the reference
in one process, 2 layers, d_model = d_hidden = d: B 2, T 8, d 16 1.19x;
B 8, T 32, d 32 1.64x; B 16, T 64, d 64 1.76x; B 32, T 128, d 128 1.29x
(61.6 -> 47.7 ms; the benchmark, tanh: 1.50x); B 32, T 128, d 256 1.17x;
B 64, T 200, d 256 1.07x (the products weigh more there). One layer at
B 1, T 4, d 8: 0.99x, a tie.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from wmfast.ops._create_graph import grads_with_graph

Tensor = torch.Tensor

_RNN_OPS = {"relu": torch.rnn_relu, "tanh": torch.rnn_tanh}

# time steps from which it runs: below, the Function's fixed host cost
# outweighs the few small products it spares. Measured on 2 CPU cores (2
# layers, a training call, alternating with the reference): 1-3 steps
# 0.81-0.98x at d 16 (1.05x at d 256, 3 steps); 4 steps 0.97-1.00x at d 16
# and 32; 5 steps 1.03-1.07x; 6 steps 1.04-1.13x.
MIN_STEPS = 5


def _layer_step_backward(nonlinearity: str, grad: Tensor, output: Tensor, out: Tensor) -> None:
    """The nonlinearity's backward for one step, as autograd runs it, into ``out``."""
    if nonlinearity == "relu":
        torch.ops.aten.threshold_backward.grad_input(grad, output, 0, grad_input=out)
    else:
        torch.ops.aten.tanh_backward.grad_input(grad, output, grad_input=out)


def _through_time(nonlinearity: str, d_out: Tensor, outputs: Tensor, w_hh: Tensor) -> Tensor:
    """Gradients at one layer's pre-activations, (T, B, H), from ``d_out``, the
    loss's gradient at its outputs (T, B, H; time-major, each step's rows
    contiguous, overwritten), and ``outputs``, the outputs themselves."""
    d_pre = torch.empty_like(d_out)
    d_out_steps, output_steps, d_pre_steps = d_out.unbind(0), outputs.unbind(0), d_pre.unbind(0)
    for t in range(d_out.shape[0] - 1, -1, -1):
        if t + 1 < d_out.shape[0]:
            # h_t feeds step t + 1 through W_hh: dL/dh_t += dL/da_{t+1} @ W_hh
            d_out_steps[t].addmm_(d_pre_steps[t + 1], w_hh)
        _layer_step_backward(nonlinearity, d_out_steps[t], output_steps[t], d_pre_steps[t])
    return d_pre


class _ElmanRNN(torch.autograd.Function):
    """Output sequence (B, T, H) of a stack of Elman layers from a zero state;
    ``weights`` are nn.RNN's per layer (w_ih, w_hh, b_ih, b_hh)."""

    @staticmethod
    def forward(ctx, x: Tensor, nonlinearity: str, *weights: Tensor) -> Tensor:
        rnn_op = _RNN_OPS[nonlinearity]
        outputs = []
        h = x
        for layer in range(len(weights) // 4):
            layer_weights = weights[4 * layer : 4 * layer + 4]
            h0 = x.new_zeros(1, x.shape[0], layer_weights[1].shape[0])
            # (input, hx, params, has_biases, num_layers, dropout, train,
            # bidirectional, batch_first); a (B, T, H) view of time-major storage
            h, _ = rnn_op(h, h0, layer_weights, True, 1, 0.0, False, False, True)
            outputs.append(h)
        ctx.nonlinearity = nonlinearity
        ctx.save_for_backward(x, *outputs, *weights)
        return h

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():  # create_graph=True
            return _differentiable_backward(ctx, grad)
        x, *saved = ctx.saved_tensors
        n_layers = len(saved) // 5
        outputs, weights = saved[:n_layers], saved[n_layers:]
        need_x, _, *need_weights = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * len(weights)
        # time-major: each step's (B, H) rows contiguous. A fresh copy, since
        # _through_time overwrites it (the layers below get theirs from here)
        d_out = grad.new_empty(grad.shape[1], grad.shape[0], grad.shape[2])
        d_out.copy_(grad.transpose(0, 1))
        for layer in range(n_layers - 1, -1, -1):
            w_ih, w_hh = weights[4 * layer], weights[4 * layer + 1]
            steps, batch, hidden = d_out.shape
            out = outputs[layer].transpose(0, 1).contiguous()  # (T, B, H): no copy (see forward)
            d_pre = _through_time(ctx.nonlinearity, d_out, out, w_hh).view(-1, hidden)
            need = need_weights[4 * layer : 4 * layer + 4]
            below = outputs[layer - 1] if layer else x  # this layer's input (B, T, D)
            if need[0]:
                grads[4 * layer] = d_pre.t().mm(below.transpose(0, 1).reshape(-1, below.shape[-1]))
            if need[1]:  # h_{t-1} W_hh for t >= 1; h_{-1} is the zero state
                previous = out[:-1].reshape(-1, hidden)
                grads[4 * layer + 1] = d_pre[batch:].t().mm(previous)
            if need[2] or need[3]:
                d_bias = d_pre.sum(0)  # both biases add to the same pre-activation
                grads[4 * layer + 2] = d_bias if need[2] else None
                grads[4 * layer + 3] = d_bias.clone() if need[3] else None  # not aliased
            if layer or need_x:
                d_out = d_pre.mm(w_ih).view(steps, batch, w_ih.shape[1])
        d_x = d_out.transpose(0, 1) if need_x else None
        return d_x, None, *grads


def _differentiable_backward(ctx, grad: Tensor):
    """_ElmanRNN's gradients as a graph autograd can differentiate again (a
    gradient penalty, Hessian-vector products): ATen's RNN recomputed from
    the saved inputs and differentiated with create_graph, as the reference
    would be. The in-place steps of the written-out backward record nothing."""
    x, *saved = ctx.saved_tensors
    weights = saved[len(saved) // 5 :]
    needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:])  # x, then the weights
    n_layers = len(weights) // 4
    h0 = x.new_zeros(n_layers, x.shape[0], weights[1].shape[0])
    rnn_op = _RNN_OPS[ctx.nonlinearity]

    def rnn(x, *weights):
        return rnn_op(x, h0, weights, True, n_layers, 0.0, False, False, True)[0]

    grads = grads_with_graph(rnn, (x, *weights), needs, grad)
    return grads[0], None, *grads[1:]


def elman_rnn(x: Tensor, weights: Sequence[Tensor], nonlinearity: str) -> Tensor:
    """``nn.RNN(..., batch_first=True, nonlinearity=nonlinearity)(x)[0]`` with
    the weights ``weights`` (w_ih, w_hh, b_ih, b_hh per layer), from a zero
    state; x: (B, T, d_model) -> (B, T, d_hidden). For calls autograd records
    (the backward is the point); where nothing records, ``rnn(x)`` is the
    same op without the Function's overhead."""
    if nonlinearity not in _RNN_OPS or len(weights) % 4 or not weights:
        raise ValueError(
            f"elman_rnn takes nonlinearity 'relu' or 'tanh' and 4 weights per layer; got "
            f"{nonlinearity!r} and {len(weights)} weights"
        )
    return _ElmanRNN.apply(x, nonlinearity, *weights)


# nn.RNN's forward picks its op by ``mode``, set from ``nonlinearity`` when built
_NONLINEARITIES = {"RNN_RELU": "relu", "RNN_TANH": "tanh"}
_WEIGHT_NAMES = (("weight", "ih"), ("weight", "hh"), ("bias", "ih"), ("bias", "hh"))


def unsupported(rnn: nn.Module) -> str | None:
    """Why elman_rnn would not compute what ``rnn`` computes, or None when it
    does (a user may change the module after building: the fast runner then
    runs the module itself)."""
    if type(rnn) is not nn.RNN:
        return f"is a {type(rnn).__name__}, not an nn.RNN"
    if rnn.mode not in _NONLINEARITIES:
        return f"has mode {rnn.mode!r}"
    if not rnn.bias or rnn.bidirectional or not rnn.batch_first or rnn.proj_size:
        return "has no biases, two directions, time-major input or projections"
    if rnn.dropout and rnn.training:
        return f"has dropout {rnn.dropout} between layers in training mode"
    params = rnn._parameters
    for layer in range(rnn.num_layers):
        if any(params.get(f"{k}_{p}_l{layer}", 0) is None for k, p in _WEIGHT_NAMES):
            return "has a weight or bias set to None"
    return None


def rnn_weights(rnn: nn.RNN) -> list[Tensor]:
    """nn.RNN's weights in elman_rnn's order (``unsupported(rnn)`` is None)."""
    return [
        getattr(rnn, f"{kind}_{part}_l{layer}")
        for layer in range(rnn.num_layers)
        for kind, part in _WEIGHT_NAMES
    ]


def rnn_forward(rnn: nn.RNN, x: Tensor) -> Tensor:
    """``rnn(x)[0]`` from a zero state, through elman_rnn (for a module that
    ``unsupported`` passes)."""
    return elman_rnn(x, rnn_weights(rnn), _NONLINEARITIES[rnn.mode])
