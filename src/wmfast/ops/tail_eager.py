"""The last layer from its attention on, through the unembedding, with a
backward that skips the positions the loss never reads: the fast path's tail
where nothing is compiled (the CPU training step).

After the last attention everything is per position: out_proj, add & norm1,
the feed-forward block, add & norm2, output_layer. A training loss that reads
some positions only (workingmem's: the answers, every 4th token) leaves the
other rows of the logits' gradient exactly zero, and per-position ops keep
those rows zero all the way back to the attention output. Autograd still
multiplies them through every matrix product, and runs the attention's
backward for every query. This backward finds the nonzero rows once, runs
the tail's backward on those rows, scatters the input gradient back (zeros
elsewhere, as autograd's would be), and, when the rows are the same
positions in every sequence, runs the attention's backward for those
queries only, under the causal mask they see.

Row for row it is the backward autograd runs (the same aten kernels,
attention included: the CPU kernels SDPA dispatches to); what changes is the
order of the sums over positions behind the weight, key and value
gradients, which drop terms that are exactly zero: within rounding of the
composition (the spec's tolerances), not bit for bit. With most rows nonzero
(a loss on all positions) it runs on all rows, as autograd does.

Measured on 2 CPU cores at the CPU benchmark shape (B 32, T 128, d_model
128, d_mlp 512, 2 layers, the answer loss), alternating in one process, the
fast training step without and with it: None 106.8 -> 90.6 ms, rotary_qk
110.8 -> 92.2 ms (the reference: 125.7 and 122.1 ms). Of that, skipping
the attention's query rows is ~4 ms (its backward: 7.3 -> 3.1 ms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from wmfast import backends

Tensor = torch.Tensor

# sizes from which the Function runs: below, its fixed costs (finding the
# rows, the mask, gathers, a Python autograd.Function) outweigh the smaller
# products. Measured on 2 CPU cores, training step with the answer loss,
# alternating with the composition: 1024 tokens: d_model 32 1.00-1.05x, 64
# 1.05x, 128 1.16x; 256-512 tokens: 0.93-1.08x; d_model 16: 0.94-0.96x at
# 1024-2048 tokens; the CPU benchmark shape (4096 tokens, d_model 128)
# 1.18-1.21x.
MIN_D_MODEL = 32
MIN_TOKENS = 1024

# run on the nonzero rows only when at most this fraction of rows is nonzero;
# above, the gathers and scatters cost more than the products they spare.
# Measured (the Function alone, CPU benchmark shape, forward and backward,
# rows only vs all rows): 1/4 of the rows 26.8 vs 47.6 ms, 1/2 35.5 vs
# 45.8 ms, 3/4 42.3 vs 44.7 ms, 9/10 46.7 vs 44.6 ms
MAX_SPARSE_FRACTION = 0.75


def rows_to_compute(grad_logits: Tensor, multiplied: tuple[Tensor, ...]) -> Tensor | None:
    """Indices of the rows of ``grad_logits`` (N, vocab) that hold a nonzero
    (NaN included), or None for all rows: when more than MAX_SPARSE_FRACTION
    of them do, or when a tensor in ``multiplied`` is not finite.

    ``multiplied``: the layer's output (N, d) and the weights the backward
    multiplies gradients by. Autograd multiplies the zero rows too, and
    0 * inf is NaN: a NaN or inf in a weight, or in any activation of the
    tail (each reaches its row of the layer's output: layer norm turns an
    inf into NaNs), makes NaNs of the composition's gradients that only the
    full backward reproduces.
    """
    rows = grad_logits.ne(0).any(1).nonzero().squeeze(1)
    if rows.numel() > MAX_SPARSE_FRACTION * grad_logits.shape[0]:
        return None
    if not all(_all_finite(t) for t in multiplied):
        return None
    return rows


def _all_finite(t: Tensor) -> bool:
    """True only if every element of ``t`` is finite: a NaN or inf makes the
    sum NaN or inf. The sum may also overflow with every element finite,
    which sends the caller to the full backward: slower, never wrong. One
    vectorised pass: ``isfinite(t).all()`` took 1.7 ms on a (4096, 256)
    tensor on 2 CPU cores, the sum 0.08 ms."""
    return bool(torch.isfinite(t.sum(dtype=torch.promote_types(t.dtype, torch.float32))))


def _norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float):
    return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)  # (out, mean, rstd)


def _norm_backward(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight, bias):
    return torch.ops.aten.native_layer_norm_backward(
        grad, x, (x.shape[-1],), mean, rstd, weight, bias, (True, True, True)
    )  # (d_x, d_weight, d_bias)


def common_positions(rows: Tensor, batch: int, seq_len: int) -> Tensor | None:
    """The positions ``rows`` (sorted indices into batch * seq_len flattened
    rows) select, when they select the same positions in every sequence
    (workingmem's batches: prepare_batch requires it); else None."""
    n_rows = rows.numel()
    if n_rows == 0 or n_rows % batch:
        return None
    positions = rows[: n_rows // batch]
    starts = torch.arange(batch, device=rows.device).unsqueeze(1) * seq_len
    if not torch.equal(rows.view(batch, -1), starts + positions):
        return None
    return positions


# PyTorch's causal attention kernels for the CPU, forward and backward: what
# scaled_dot_product_attention(is_causal=True) dispatches to there, called
# directly so the backward can run for some query rows only
_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_attention_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _attention_grads(d_out, q, k, v, out, lse, positions):
    """(d_q, d_k, d_v), all (B, H, T, D), from d_out (B, H, S, D): the output's
    gradient at ``positions`` (S of them; all T when None), zero elsewhere.

    For some positions, the backward runs for those query rows only, under
    the causal mask those rows see; their d_q rows are exact, and d_k, d_v
    sum over the same nonzero terms as the full backward."""
    if positions is None:
        return _attention_backward(d_out, q, k, v, out, lse, 0.0, True)
    keys = torch.arange(k.shape[2], device=k.device)
    mask = torch.zeros(positions.numel(), keys.numel(), dtype=q.dtype, device=q.device)
    mask.masked_fill_(keys > positions.unsqueeze(1), float("-inf"))  # (S, T): causal
    pick = (slice(None), slice(None), positions)
    d_q_rows, d_k, d_v = _attention_backward(
        d_out, q[pick], k, v, out[pick], lse[pick], 0.0, False, attn_mask=mask
    )
    d_q = d_q_rows.new_zeros(q.shape)
    d_q[pick] = d_q_rows
    return d_q, d_k, d_v


class _Tail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, x, wo, bo, w1, b1, w2, b2, n1w, n1b, n2w, n2b, wu, bu, eps, gelu):
        # the weights in LayerWeights' order, in_proj's left out
        batch, seq_len, d_model = x.shape
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D) views
        out, lse = _attention(q, k, v, 0.0, True)  # causal, SDPA's default scale
        a = out.transpose(1, 2).reshape(-1, d_model)  # (N, d): heads merged
        r1 = torch.addmm(bo, a, wo.t()).add_(x.reshape(-1, d_model))  # x + self_attn(x)
        h, mean1, rstd1 = _norm(r1, n1w, n1b, eps)  # norm1
        u = torch.addmm(b1, h, w1.t())  # linear1, (N, d_mlp)
        g = F.gelu(u) if gelu else u.relu_()  # ReLU's backward reads its output
        r2 = torch.addmm(b2, g, w2.t()).add_(h)  # h + linear2(act(h))
        y, mean2, rstd2 = _norm(r2, n2w, n2b, eps)  # norm2: the layer's output
        logits = torch.addmm(bu, y, wu.t())  # output_layer, (N, vocab)
        ctx.save_for_backward(q, k, v, out, lse, a, r1, mean1, rstd1, h, u if gelu else g, g,
                              r2, mean2, rstd2, y, wo, n1w, n1b, w1, w2, n2w, n2b, wu)  # fmt: skip
        ctx.gelu = gelu
        return logits.view(batch, seq_len, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits):
        (q, k, v, out, lse, a, r1, mean1, rstd1, h, u, g, r2, mean2, rstd2, y,
         wo, n1w, n1b, w1, w2, n2w, n2b, wu) = ctx.saved_tensors  # fmt: skip
        batch, heads, seq_len, head_dim = q.shape
        dl = grad_logits.reshape(-1, grad_logits.shape[-1])  # (N, vocab)
        n_rows = dl.shape[0]
        rows = rows_to_compute(dl, (y, wu, n2w, w2, w1, n1w, wo))
        sparse = rows is not None

        def take(t: Tensor) -> Tensor:
            return t.index_select(0, rows) if sparse else t

        dl, y = take(dl), take(y)
        d_wu, d_bu = dl.t().mm(y), dl.sum(0)
        d_r2, d_n2w, d_n2b = _norm_backward(dl.mm(wu), take(r2), take(mean2), take(rstd2), n2w, n2b)
        g = take(g)
        d_w2, d_b2 = d_r2.t().mm(g), d_r2.sum(0)
        d_g = d_r2.mm(w2)
        if ctx.gelu:
            d_u = torch.ops.aten.gelu_backward(d_g, take(u))
        else:  # in place: zero where ReLU's output is not positive
            d_u = torch.ops.aten.threshold_backward.grad_input(d_g, g, 0, grad_input=d_g)
        h = take(h)
        d_w1, d_b1 = d_u.t().mm(h), d_u.sum(0)
        d_h = d_u.mm(w1).add_(d_r2)  # through linear1 and the residual
        d_r1, d_n1w, d_n1b = _norm_backward(d_h, take(r1), take(mean1), take(rstd1), n1w, n1b)
        d_wo, d_bo = d_r1.t().mm(take(a)), d_r1.sum(0)
        d_a = d_r1.mm(wo)  # (rows, d): the attention output's gradient
        d_x = d_r1
        positions = common_positions(rows, batch, seq_len) if sparse else None
        if sparse:  # the other rows' gradients are zero
            d_x = d_x.new_zeros(n_rows, d_x.shape[1]).index_copy_(0, rows, d_x)
            if positions is None:  # rows differ between sequences: attention on all rows
                d_a = d_a.new_zeros(n_rows, d_a.shape[1]).index_copy_(0, rows, d_a)
        d_out = d_a.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, H, S or T, D)
        d_q, d_k, d_v = _attention_grads(d_out, q, k, v, out, lse, positions)
        return (d_q.transpose(1, 2), d_k.transpose(1, 2), d_v.transpose(1, 2),
                d_x.view(batch, seq_len, -1), d_wo, d_bo, d_w1, d_b1, d_w2, d_b2,
                d_n1w, d_n1b, d_n2w, d_n2b, d_wu, d_bu, None, None)  # fmt: skip


def transformer_tail(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    x: Tensor,
    layer,
    output_weight: Tensor,
    output_bias: Tensor,
    eps: float,
    act_fn: str,
) -> Tensor | None:
    """logits (B, T, vocab) from the last layer's q, k, v (B, T, H, D) and its
    input ``x`` (B, T, d), for a post-norm layer without dropout (eval mode,
    or dropout 0); ``layer``: its LayerWeights.

    Returns None where the tail should run as the composition: below
    MIN_D_MODEL or MIN_TOKENS, no gradient needed,
    ``backends.eager_functions_allowed`` says no, a tensor not on the CPU
    (finding the nonzero rows would be a host-device sync per backward on
    CUDA), a missing bias, or tensors of mixed dtypes or devices.
    """
    tensors = (q, k, v, x, *layer[2:], output_weight, output_bias)  # all but in_proj's
    if not (
        x.shape[-1] >= MIN_D_MODEL
        and x.numel() // x.shape[-1] >= MIN_TOKENS
        and all(t is not None for t in tensors)
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and backends.eager_functions_allowed(x.device.type)
        and len({t.dtype for t in tensors}) == 1
        and len({t.device for t in tensors}) == 1  # all on the CPU
    ):
        return None
    return _Tail.apply(q, k, v, x, *layer[2:], output_weight, output_bias, eps, act_fn == "gelu")
