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

A backward with create_graph (a gradient penalty) recomputes the plain
composition from the saved inputs and differentiates that instead
(wmfast.ops._create_graph), so gradients of gradients are the reference's.

In training with dropout, the attention (whose dropout SDPA's kernel draws)
runs before the tail under autograd, with a backward for every query; the
tail draws the rest of the layer's masks as the reference does and applies
them itself (``_TailAfterDroppedAttention``): the same seed gives the
reference's masks, so CPU training keeps its mask-for-mask contract.

Measured on 2 CPU cores at the CPU benchmark shape (B 32, T 128, d_model
128, d_mlp 512, 2 layers, the answer loss), alternating in one process, the
fast training step without and with it: None 106.8 -> 90.6 ms, rotary_qk
110.8 -> 92.2 ms (the reference: 125.7 and 122.1 ms). Of that, skipping
the attention's query rows is ~4 ms (its backward: 7.3 -> 3.1 ms).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from wmfast import backends
from wmfast.ops._create_graph import grads_with_graph

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

# in training with dropout, from this d_model or d_mlp up. There the
# attention's backward runs for every query (its dropout is drawn inside
# SDPA's kernel), so less is spared, and the masks cost a pass each. Measured
# on 2 CPU cores (answer loss, AdamW, p 0.1, alternating with the composition
# in one process): d_model 32-128 at d_mlp 0-48, 1024 tokens, 0.93-0.99x;
# d_model 128 d_mlp 256 1.03-1.10x; d_model 64 d_mlp 256 1.06x; d_model 256
# d_mlp 0 1.02-1.05x; 512 at d_mlp 0 (workingmem's defaults) 1.05x;
# d_model 128 d_mlp 512, 4096 tokens, 1.10-1.11x
MIN_WIDTH_WITH_DROPOUT = 256


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
    # |g| max per row is 0 only for a row of zeros, and NaN for a row with a
    # NaN: the same rows as ne(0).any(1), in a fifth of its time (4096 x 350
    # fp32 on 2 cores: 0.32 ms against 1.5; bool reductions are slow on the CPU)
    rows = grad_logits.abs().amax(1).ne(0).nonzero().squeeze(1)
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


_NO_MASKS = (None, None, None)


def _dropped(t: Tensor, mask: Tensor | None) -> Tensor:
    """``t`` with its dropout mask (0 or 1/(1-p)) applied in place; ``t`` as is without one."""
    return t if mask is None else t.mul_(mask)


def _rest_forward(a, x, weights, eps, gelu, masks):
    """logits (N, vocab) from the heads-merged attention output ``a`` and the
    layer input ``x`` (both (N, d)): out_proj, add & norm1, the feed-forward
    block, add & norm2, output_layer, each dropout (dropout1, the block's,
    dropout2) as its mask (N, width) or None. Also what _rest_backward reads."""
    wo, bo, w1, b1, w2, b2, n1w, n1b, n2w, n2b, wu, bu = weights
    m1, m_ffn, m2 = masks
    r1 = _dropped(torch.addmm(bo, a, wo.t()), m1).add_(x)  # x + dropout1(self_attn(x))
    h, mean1, rstd1 = _norm(r1, n1w, n1b, eps)  # norm1
    u = torch.addmm(b1, h, w1.t())  # linear1, (N, d_mlp)
    g = F.gelu(u) if gelu else u.relu_()  # ReLU's backward reads its output
    ffn_in = g if m_ffn is None else g * m_ffn  # what linear2 takes
    r2 = _dropped(torch.addmm(b2, ffn_in, w2.t()), m2).add_(h)  # h + dropout2(linear2(...))
    y, mean2, rstd2 = _norm(r2, n2w, n2b, eps)  # norm2: the layer's output
    logits = torch.addmm(bu, y, wu.t())  # output_layer, (N, vocab)
    act_in = u if gelu else g  # what the activation's backward reads
    kept = (a, r1, mean1, rstd1, h, act_in, None if ffn_in is act_in else ffn_in, r2, mean2,
            rstd2, y, wo, n1w, n1b, w1, w2, n2w, n2b, wu, m1, m_ffn, m2)  # fmt: skip
    return logits, kept


def _rest_composition(a, x, weights, eps, gelu, masks):
    """_rest_forward's logits in plain differentiable ops, for a backward
    with create_graph; a and x (N, d)."""
    wo, bo, w1, b1, w2, b2, n1w, n1b, n2w, n2b, wu, bu = weights
    m1, m_ffn, m2 = masks
    width = (x.shape[-1],)
    sa = F.linear(a, wo, bo)
    h = F.layer_norm(x + (sa if m1 is None else sa * m1), width, n1w, n1b, eps)
    u = F.linear(h, w1, b1)
    g = F.gelu(u) if gelu else F.relu(u)
    f = F.linear(g if m_ffn is None else g * m_ffn, w2, b2)
    y = F.layer_norm(h + (f if m2 is None else f * m2), width, n2w, n2b, eps)
    return F.linear(y, wu, bu)


def _tail_composition(q, k, v, x, weights, eps, gelu):
    """_Tail's logits (B, T, vocab) in plain differentiable ops, SDPA's causal
    attention included (whose CPU flash kernel has no double backward, on the
    reference as here: the caller picks SDPA's math backend for one)."""
    batch, seq_len, d_model = x.shape
    heads = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    out = F.scaled_dot_product_attention(*heads, is_causal=True)
    a = out.transpose(1, 2).reshape(-1, d_model)
    logits = _rest_composition(a, x.reshape(-1, d_model), weights, eps, gelu, _NO_MASKS)
    return logits.view(batch, seq_len, -1)


def _rest_backward(dl, kept, gelu):
    """(rows, d_a, d_x, the weights' gradients in _rest_forward's order) from
    the logits' gradient ``dl`` (N, vocab): on the rows the loss reads
    (``rows``; d_a and d_x hold those rows only), or on all rows (rows None)."""
    (a, r1, mean1, rstd1, h, act_in, ffn_in, r2, mean2, rstd2, y,
     wo, n1w, n1b, w1, w2, n2w, n2b, wu, m1, m_ffn, m2) = kept  # fmt: skip
    rows = rows_to_compute(dl, (y, wu, n2w, w2, w1, n1w, wo))

    def take(t: Tensor | None) -> Tensor | None:
        return t.index_select(0, rows) if rows is not None and t is not None else t

    dl, y = take(dl), take(y)
    d_wu, d_bu = dl.t().mm(y), dl.sum(0)
    d_r2, d_n2w, d_n2b = _norm_backward(dl.mm(wu), take(r2), take(mean2), take(rstd2), n2w, n2b)
    d_f = d_r2 if m2 is None else d_r2 * take(m2)  # d_r2 itself flows on through the residual
    act_in = take(act_in)
    ffn_in = act_in if ffn_in is None else take(ffn_in)
    d_w2, d_b2 = d_f.t().mm(ffn_in), d_f.sum(0)
    d_g = _dropped(d_f.mm(w2), take(m_ffn))
    if gelu:
        d_u = torch.ops.aten.gelu_backward(d_g, act_in)
    else:  # in place: zero where ReLU's output is not positive
        d_u = torch.ops.aten.threshold_backward.grad_input(d_g, act_in, 0, grad_input=d_g)
    h = take(h)
    d_w1, d_b1 = d_u.t().mm(h), d_u.sum(0)
    d_h = d_u.mm(w1).add_(d_r2)  # through linear1 and the residual
    d_r1, d_n1w, d_n1b = _norm_backward(d_h, take(r1), take(mean1), take(rstd1), n1w, n1b)
    d_sa = d_r1 if m1 is None else d_r1 * take(m1)
    d_wo, d_bo = d_sa.t().mm(take(a)), d_sa.sum(0)
    d_a = d_sa.mm(wo)  # (rows, d): the attention output's gradient
    weight_grads = (d_wo, d_bo, d_w1, d_b1, d_w2, d_b2, d_n1w, d_n1b, d_n2w, d_n2b, d_wu, d_bu)
    return rows, d_a, d_r1, weight_grads


def _scatter_rows(t: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """(n_rows, width): ``t``'s rows at ``rows``, zeros elsewhere (as autograd's would be)."""
    return t.new_zeros(n_rows, t.shape[1]).index_copy_(0, rows, t)


def dropout_masks(x: Tensor, d_mlp: int, p: float, time_major_dropout1: bool):
    """The masks (N, width), 0 or 1/(1-p), of dropout1, the feed-forward
    block's dropout and dropout2 for the layer input ``x`` (B, T, d), drawn
    as the reference draws them: in that order, each by F.dropout on a
    tensor of the shape and memory order the reference drops (dropout1's in
    (T, B, d) order after nn.MultiheadAttention: time_major_dropout1; why:
    transformer_functional._dropout_in_time_major_order). F.dropout
    multiplies by its mask, so dropping ones gives the mask itself: the same
    seed gives the reference's masks without reaching into how it draws."""
    batch, seq_len, d_model = x.shape
    if time_major_dropout1:
        m1 = F.dropout(x.new_ones(seq_len, batch, d_model), p, True).transpose(0, 1)
    else:
        m1 = F.dropout(x.new_ones(batch, seq_len, d_model), p, True)
    m_ffn = F.dropout(x.new_ones(batch, seq_len, d_mlp), p, True)
    m2 = F.dropout(x.new_ones(batch, seq_len, d_model), p, True)
    return tuple(m.reshape(batch * seq_len, -1) for m in (m1, m_ffn, m2))


class _Tail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, x, wo, bo, w1, b1, w2, b2, n1w, n1b, n2w, n2b, wu, bu, eps, gelu):
        # the weights in LayerWeights' order, in_proj's left out
        batch, seq_len, d_model = x.shape
        heads = [t.transpose(1, 2) for t in (q, k, v)]  # (B, H, T, D) views
        out, lse = _attention(*heads, 0.0, True)  # causal, SDPA's default scale
        a = out.transpose(1, 2).reshape(-1, d_model)  # (N, d): heads merged
        weights = (wo, bo, w1, b1, w2, b2, n1w, n1b, n2w, n2b, wu, bu)
        logits, kept = _rest_forward(a, x.reshape(-1, d_model), weights, eps, gelu, _NO_MASKS)
        # the inputs themselves, not the views made here without grad: a
        # backward with create_graph needs their graph
        inputs = (q, k, v, x, *weights)
        ctx.save_for_backward(out, lse, *kept, *inputs)
        ctx.eps, ctx.gelu, ctx.n_inputs = eps, gelu, len(inputs)
        return logits.view(batch, seq_len, -1)

    @staticmethod
    def backward(ctx, grad_logits):
        saved = ctx.saved_tensors  # out, lse, kept, then the inputs
        (out, lse, *kept), inputs = saved[: -ctx.n_inputs], saved[-ctx.n_inputs :]
        if torch.is_grad_enabled():  # create_graph=True: wmfast.ops._create_graph

            def composition(q, k, v, x, *weights):
                return _tail_composition(q, k, v, x, weights, ctx.eps, ctx.gelu)

            needs = ctx.needs_input_grad[: ctx.n_inputs]
            return *grads_with_graph(composition, inputs, needs, grad_logits), None, None
        q, k, v = (t.transpose(1, 2) for t in inputs[:3])  # (B, H, T, D), as attended
        batch, heads, seq_len, head_dim = q.shape
        dl = grad_logits.reshape(-1, grad_logits.shape[-1])  # (N, vocab)
        n_rows = dl.shape[0]
        rows, d_a, d_x, weight_grads = _rest_backward(dl, kept, ctx.gelu)
        positions = common_positions(rows, batch, seq_len) if rows is not None else None
        if rows is not None:  # the other rows' gradients are zero
            d_x = _scatter_rows(d_x, rows, n_rows)
            if positions is None:  # rows differ between sequences: attention on all rows
                d_a = _scatter_rows(d_a, rows, n_rows)
        d_out = d_a.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, H, S or T, D)
        d_q, d_k, d_v = _attention_grads(d_out, q, k, v, out, lse, positions)
        return (d_q.transpose(1, 2), d_k.transpose(1, 2), d_v.transpose(1, 2),
                d_x.view(batch, seq_len, -1), *weight_grads, None, None)  # fmt: skip


class _TailAfterDroppedAttention(torch.autograd.Function):
    """The tail in training with dropout: attention (and its dropout) runs
    before it, under autograd, and the dropout masks of the rest of the layer
    come in drawn (``dropout_masks``); the per-position backward then runs on
    the rows the loss reads, the attention's on all of them."""

    @staticmethod
    def forward(ctx, a, x, wo, bo, w1, b1, w2, b2, n1w, n1b, n2w, n2b, wu, bu, eps, gelu, *masks):
        batch, seq_len, d_model = x.shape
        weights = (wo, bo, w1, b1, w2, b2, n1w, n1b, n2w, n2b, wu, bu)
        flat = (a.reshape(-1, d_model), x.reshape(-1, d_model))
        logits, kept = _rest_forward(*flat, weights, eps, gelu, masks)
        inputs = (a, x, *weights)  # for a backward with create_graph
        ctx.save_for_backward(*kept, *inputs)
        ctx.eps, ctx.gelu, ctx.n_inputs = eps, gelu, len(inputs)
        return logits.view(batch, seq_len, -1)

    @staticmethod
    def backward(ctx, grad_logits):
        batch, seq_len, _ = grad_logits.shape
        saved = ctx.saved_tensors  # kept (its last three: the masks), then the inputs
        kept, inputs = saved[: -ctx.n_inputs], saved[-ctx.n_inputs :]
        masks = kept[-3:]
        if torch.is_grad_enabled():  # create_graph=True: wmfast.ops._create_graph

            def composition(a, x, *weights):
                flat = (a.reshape(-1, x.shape[-1]), x.reshape(-1, x.shape[-1]))
                logits = _rest_composition(*flat, weights, ctx.eps, ctx.gelu, masks)
                return logits.view(grad_logits.shape)

            needs = ctx.needs_input_grad[: ctx.n_inputs]
            grads = grads_with_graph(composition, inputs, needs, grad_logits)
            return *grads, None, None, None, None, None
        dl = grad_logits.reshape(batch * seq_len, -1)  # (N, vocab)
        rows, d_a, d_x, weight_grads = _rest_backward(dl, kept, ctx.gelu)
        if rows is not None:  # the other rows' gradients are zero
            d_a, d_x = (_scatter_rows(t, rows, batch * seq_len) for t in (d_a, d_x))
        return (d_a.view(batch, seq_len, -1), d_x.view(batch, seq_len, -1), *weight_grads,
                None, None, None, None, None)  # fmt: skip


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
    dropout: float = 0.0,
    attend: Callable | None = None,
    time_major_dropout1: bool = False,
) -> Tensor | None:
    """logits (B, T, vocab) from the last layer's q, k, v (B, T, H, D) and its
    input ``x`` (B, T, d), for a post-norm layer; ``layer``: its LayerWeights.

    ``dropout``: the p of a training call (0 in eval mode). With dropout the
    attention runs first through ``attend(q, k, v, p)`` (the composition's:
    its backward then runs for every query), then the rest of the layer with
    the masks ``dropout_masks`` draws: the reference's masks, in the
    reference's order (``time_major_dropout1``: see dropout_masks).

    Returns None where the tail should run as the composition: below
    MIN_D_MODEL or MIN_TOKENS, or with dropout below MIN_WIDTH_WITH_DROPOUT
    (before attending: the composition then draws the attention's masks),
    no gradient needed,
    ``backends.eager_functions_allowed`` says no, a tensor not on the CPU
    (finding the nonzero rows would be a host-device sync per backward on
    CUDA), a missing bias, or tensors of mixed dtypes or devices.
    """
    tensors = (q, k, v, x, *layer[2:], output_weight, output_bias)  # all but in_proj's
    # the device and eager_functions_allowed first: under torch.compile (or
    # on CUDA) they end the test before the size comparisons, which would
    # otherwise become guards on the token count and recompile a dynamic
    # graph where one flips
    if not (
        x.device.type == "cpu"
        and backends.eager_functions_allowed(x.device.type)
        and torch.is_grad_enabled()
        and x.shape[-1] >= MIN_D_MODEL
        and x.numel() // x.shape[-1] >= MIN_TOKENS
        and all(t is not None for t in tensors)
        and (
            dropout == 0.0
            or max(x.shape[-1], layer.linear1_weight.shape[0]) >= MIN_WIDTH_WITH_DROPOUT
        )
        and any(t.requires_grad for t in tensors)
        and len({t.dtype for t in tensors}) == 1
        and len({t.device for t in tensors}) == 1  # all on the CPU
    ):
        return None
    rest = (*layer[2:], output_weight, output_bias, eps, act_fn == "gelu")
    if dropout == 0.0:
        return _Tail.apply(q, k, v, x, *rest)
    a = attend(q, k, v, dropout).reshape(x.shape)  # heads merged; draws the attention's masks
    masks = dropout_masks(x, layer.linear1_weight.shape[0], dropout, time_major_dropout1)
    return _TailAfterDroppedAttention.apply(a, x, *rest, *masks)
