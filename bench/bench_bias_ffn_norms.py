"""The two add & norms of an encoder layer at d_mlp 0 (workingmem's default:
the SIR model) against their peers: the pure-torch composition, the same under
torch.compile (Inductor's kernels), two calls of wmfast's single
dropout + add + LayerNorm op, and the fused op (wmfast.ops.bias_ffn_norms,
what norm="triton" runs at d_mlp 0).

Each call computes ``out = norm2(norm1(x + dropout(y)) + dropout(c))`` (c: the
feed-forward block's bias, at every position) and, under bf16 autocast, out's
bf16 copy for the next matrix product; backward from gradients of both.
Groups: ``bias_ffn_norms/{fwd,fwdbwd}/{shape}/{dtypes}``; ``gb_per_s`` counts
the bytes the fused op moves (wmfast.ops.bias_ffn_norms' docstring: 18 B per
position and feature each way at the SIR shape in bf16).

Run on a GPU:  pytest bench/bench_bias_ffn_norms.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .bench_layer_norm import (
    EPS,
    SHAPES_CPU,
    SHAPES_CUDA,
    P,
    _name,
    impl_directions,
    norm_cases,
)
from .timing import kernel_calls_per_round, time_it

pytestmark = pytest.mark.triton

IMPLS = ["torch_eager", "torch_compile", "wmfast_single_ops", "wmfast_triton"]


def _composition(x, y, w1, b1, c, w2, b2, low_dtype):
    """The fast model's norm="torch" steps at d_mlp 0, plus the cast autocast
    makes in the next product."""
    d = x.shape[-1:]
    x1 = F.layer_norm(x + F.dropout(y, P, True), d, w1, b1, EPS)
    out = F.layer_norm(x1 + F.dropout(c.expand(x1.shape), P, True), d, w2, b2, EPS)
    return out, (out.to(low_dtype) if low_dtype is not None else out)


@pytest.fixture(scope="module")
def compiled_composition():
    return torch.compile(_composition, dynamic=False)


@pytest.mark.parametrize("impl, direction", impl_directions(IMPLS))
@pytest.mark.parametrize("shape, x_dtype, y_dtype, low_dtype", norm_cases())
def bench_bias_ffn_norms(
    benchmark, device, compiled_composition, shape, x_dtype, y_dtype, low_dtype, impl, direction
):
    from wmfast.ops import bias_ffn_norms, layer_norm

    batch, seq_len, d_model = {**SHAPES_CUDA, **SHAPES_CPU}[shape]
    dtypes = "-".join(map(_name, (x_dtype, y_dtype, low_dtype)))
    benchmark.group = f"bias_ffn_norms/{direction}/{shape}/{dtypes}"
    gen = torch.Generator().manual_seed(0)
    grad = direction == "fwdbwd"
    shape3 = (batch, seq_len, d_model)

    def draw(size, dtype=torch.float32, scale=1.0, shift=0.0):
        t = shift + scale * torch.randn(size, generator=gen)
        return t.to(device, dtype).requires_grad_(grad)

    x, y = draw(shape3, x_dtype), draw(shape3, y_dtype)
    w1, b1 = draw(d_model, scale=0.1, shift=1.0), draw(d_model, scale=0.1)
    c = draw(d_model, y_dtype, scale=0.1)  # linear2's bias, in the block output's dtype
    w2, b2 = draw(d_model, scale=0.1, shift=1.0), draw(d_model, scale=0.1)
    inputs = (x, y, w1, b1, c, w2, b2)
    g_out = torch.randn(shape3, generator=gen).to(device)
    g_low = torch.randn(shape3, generator=gen).to(device, low_dtype) if low_dtype else None

    def forward():
        if impl == "wmfast_triton":
            return bias_ffn_norms.bias_ffn_norms(*inputs, EPS, P, True, low_dtype)
        if impl == "wmfast_single_ops":
            x1, _ = layer_norm.dropout_add_layer_norm(x, y, w1, b1, EPS, P, True)
            ffn = c.expand(shape3)
            return layer_norm.dropout_add_layer_norm(x1, ffn, w2, b2, EPS, P, True, low_dtype)
        norm = _composition if impl == "torch_eager" else compiled_composition
        return norm(*inputs, low_dtype)

    def fn():
        out, low = forward()
        if grad:
            outs, grads = ((out, low), (g_out, g_low)) if low_dtype else ((out,), (g_out,))
            torch.autograd.backward(outs, grads)
            for t in inputs:
                t.grad = None

    numel = batch * seq_len * d_model
    size = {dt: torch.empty((), dtype=dt).element_size() for dt in (x_dtype, y_dtype)}
    low_size = torch.empty((), dtype=low_dtype).element_size() if low_dtype else 0
    s_size = size[x_dtype]  # the first sum, kept for the backward
    # read x, y; write the sum, two 1-byte masks, out (fp32) and its copy
    forward_bytes = numel * (size[x_dtype] + size[y_dtype] + s_size + 2 + 4 + low_size)
    # read out's two gradients, the sum, both masks; write x's and y's gradients
    backward_bytes = numel * (4 + low_size + s_size + 2 + size[x_dtype] + size[y_dtype])
    with torch.set_grad_enabled(grad):
        time_it(
            benchmark,
            fn,
            device,
            calls=kernel_calls_per_round(device, numel),
            bytes_per_call=forward_bytes + (backward_bytes if grad else 0),
            shape=list(shape3),
            dtype=dtypes,
            impl=impl,
            direction=direction,
        )
