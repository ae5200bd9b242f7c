"""dropout + add + LayerNorm (each post-LN block's tail) against its peers: the
pure-torch composition, the same under torch.compile (Inductor's fused
kernels: what the fast model's compiled step runs with norm="torch"), and
wmfast's Triton kernels (norm="triton").

Each call computes what the fast model's training step asks for at one
norm: ``out = layer_norm(x + dropout(y))`` and, under bf16 autocast, out's
bf16 copy for the next matrix product; backward from gradients of both.
Groups: ``dropout_add_layer_norm/{fwd,fwdbwd}/{shape}/{dtypes}``;
``gb_per_s`` counts the bytes the op must move at least (read x and y,
write out and its copy; backward: read both gradients and x + y again,
write the gradients of x and y), masks and weights excluded.

What it decided: FastOptions(norm="auto") takes "triton" in compiled CUDA
training calls, where wmfast's forward+backward beat Inductor's here at the
SIR shape (1.36 against 1.99 ms on an H100) and the model benchmark agreed
(``fast`` against ``fast_torch_norm``).

Run on a GPU:  pytest bench/bench_layer_norm.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .timing import kernel_calls_per_round, time_it

pytestmark = pytest.mark.triton

EPS = 1e-5
P = 0.1  # workingmem's dropout
SHAPES_CUDA = {"sir_d512": (256, 800, 512), "small_d256": (64, 200, 256)}
SHAPES_CPU = {"tiny": (2, 8, 32)}
# (x dtype, y dtype, low dtype): the bf16 autocast step (fp32 residual stream,
# bf16 block output, bf16 copy for the next product) and the fp32 step
CASES_CUDA = [
    ("sir_d512", torch.float32, torch.bfloat16, torch.bfloat16),
    ("sir_d512", torch.float32, torch.float32, None),
    ("small_d256", torch.float32, torch.bfloat16, torch.bfloat16),
]
CASES_CPU = [("tiny", torch.float32, torch.float32, None)]
IMPLS = ["torch_eager", "torch_compile", "wmfast_triton"]


def _name(dtype) -> str:
    return "none" if dtype is None else str(dtype).split(".")[-1]


def norm_cases():
    """(shape, x dtype, y dtype, low dtype) cases of the norm benchmarks."""
    cases = CASES_CUDA if torch.cuda.is_available() else CASES_CPU
    return [pytest.param(*case, id="-".join((case[0], *map(_name, case[1:])))) for case in cases]


def impl_directions(impls: list[str]):
    """(impl, direction) cases of the norm benchmarks (this one and
    bench_bias_ffn_norms); wmfast's backwards loop over rows, which the Triton
    interpreter of triton < 3.7 cannot run with numpy >= 2.5 (marker
    triton_loops, root conftest.py)."""
    return [
        pytest.param(
            impl,
            direction,
            id=f"{impl}-{direction}",
            marks=pytest.mark.triton_loops
            if impl.startswith("wmfast") and direction == "fwdbwd"
            else (),
        )
        for direction in ("fwd", "fwdbwd")
        for impl in impls
    ]


def _composition(x, y, weight, bias, low_dtype):
    """The fast model's norm="torch" steps (transformer_functional.torch_add_norm),
    plus the cast autocast makes in the next product."""
    out = F.layer_norm(x + F.dropout(y, P, True), x.shape[-1:], weight, bias, EPS)
    return out, (out.to(low_dtype) if low_dtype is not None else out)


@pytest.fixture(scope="module")
def compiled_composition():
    return torch.compile(_composition, dynamic=False)


@pytest.fixture(scope="module")
def ops():
    from wmfast.ops import layer_norm

    return layer_norm


@pytest.mark.parametrize("impl, direction", impl_directions(IMPLS))
@pytest.mark.parametrize("shape, x_dtype, y_dtype, low_dtype", norm_cases())
def bench_dropout_add_layer_norm(
    benchmark,
    device,
    ops,
    compiled_composition,
    shape,
    x_dtype,
    y_dtype,
    low_dtype,
    impl,
    direction,
):
    batch, seq_len, d_model = {**SHAPES_CUDA, **SHAPES_CPU}[shape]
    dtypes = "-".join(map(_name, (x_dtype, y_dtype, low_dtype)))
    benchmark.group = f"dropout_add_layer_norm/{direction}/{shape}/{dtypes}"
    gen = torch.Generator().manual_seed(0)
    grad = direction == "fwdbwd"
    shape3 = (batch, seq_len, d_model)
    x = torch.randn(shape3, generator=gen).to(device, x_dtype).requires_grad_(grad)
    y = torch.randn(shape3, generator=gen).to(device, y_dtype).requires_grad_(grad)
    weight = (1 + 0.1 * torch.randn(d_model, generator=gen)).to(device).requires_grad_(grad)
    bias = (0.1 * torch.randn(d_model, generator=gen)).to(device).requires_grad_(grad)
    g_out = torch.randn(shape3, generator=gen).to(device)
    g_low = torch.randn(shape3, generator=gen).to(device, low_dtype) if low_dtype else None

    def forward():
        if impl == "wmfast_triton":
            return ops.dropout_add_layer_norm(x, y, weight, bias, EPS, P, True, low_dtype)
        norm = _composition if impl == "torch_eager" else compiled_composition
        return norm(x, y, weight, bias, low_dtype)

    def fn():
        out, low = forward()
        if grad:
            outs, grads = ((out, low), (g_out, g_low)) if low_dtype else ((out,), (g_out,))
            torch.autograd.backward(outs, grads)
            for t in (x, y, weight, bias):
                t.grad = None

    numel = batch * seq_len * d_model
    size = {dt: torch.empty((), dtype=dt).element_size() for dt in (x_dtype, y_dtype)}
    low_size = torch.empty((), dtype=low_dtype).element_size() if low_dtype else 0
    forward_bytes = numel * (size[x_dtype] + size[y_dtype] + 4 + low_size)
    backward_bytes = numel * (4 + low_size + 2 * (size[x_dtype] + size[y_dtype]))
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
