"""The Triton dropout + add + LayerNorm kernels through their launchers: forward
and backward values against fp64 over drawn shapes, dtypes and layouts; the
dropout mask's rate and stability; clear errors.

On CPU these run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU); on CUDA the same tests run compiled.
The interpreter truncates where the GPU rounds to nearest when it converts to
bf16 (triton 3.9), so bf16 results are held to one bf16 step, not bitwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ..helpers import STORAGE_TOLERANCE, kernel_device

pytestmark = pytest.mark.triton

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# normalized sizes: tiny, odd, non-powers of two, the SIR model's 512
N_COLS = (1, 3, 6, 48, 100, 512)
EPS = 1e-5


@pytest.fixture(scope="module")
def K():
    from wmfast.kernels import layer_norm

    return layer_norm


def _randn(gen, shape, dtype, device):
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return max(a, b, key=lambda dtype: STORAGE_TOLERANCE[dtype]["rtol"])


def _layer_norm_fp64(s, weight, bias):
    return F.layer_norm(s.double(), s.shape[-1:], weight.double(), bias.double(), EPS)


@given(
    lead=st.sampled_from([(1,), (5,), (2, 7), (3, 1, 4)]),
    n_cols=st.sampled_from(N_COLS),
    x_dtype=st.sampled_from(DTYPES),
    y_dtype=st.sampled_from(DTYPES),
    p=st.sampled_from([0.0, 0.1, 0.5]),
    y_rows=st.sampled_from(["own", "broadcast"]),
    low=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_forward_matches_fp64(K, lead, n_cols, x_dtype, y_dtype, p, y_rows, low, seed):
    gen = torch.Generator().manual_seed(seed)
    device = kernel_device()
    shape = (*lead, n_cols)
    x = _randn(gen, shape, x_dtype, device)
    if y_rows == "broadcast":  # the d_mlp 0 block: one bias row for every position
        y = _randn(gen, (n_cols,), y_dtype, device).expand(shape)
    else:
        y = _randn(gen, shape, y_dtype, device)
    weight, bias = (
        _randn(gen, (n_cols,), torch.float32, device),
        _randn(gen, (n_cols,), torch.float32, device),
    )
    s_dtype = torch.promote_types(x_dtype, y_dtype)
    out = torch.empty(shape, dtype=s_dtype, device=device)
    low_out = torch.empty(shape, dtype=torch.bfloat16, device=device) if low else None
    s = torch.empty(shape, dtype=s_dtype, device=device)
    keep = torch.empty(shape, dtype=torch.bool, device=device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device) if p else None
    K.dropout_add_layer_norm_fwd_launch(
        x, y, weight, bias, seed_t, p, EPS, out, low_out, s, keep if p else None
    )

    kept = keep.double() / (1 - p) if p else 1.0
    want_s = x.double() + y.double() * kept
    # the dropped-out y is rounded to y's dtype, the sum to s's: one step of the coarser
    tol = STORAGE_TOLERANCE[_coarser(s_dtype, y_dtype)]
    torch.testing.assert_close(s.double(), want_s, rtol=2 * tol["rtol"], atol=2 * tol["atol"])
    # the norm of the sum the kernel formed: only the final rounding differs
    want = _layer_norm_fp64(s, weight, bias)
    torch.testing.assert_close(out.double(), want, **STORAGE_TOLERANCE[s_dtype])
    if low:
        torch.testing.assert_close(low_out.double(), want, **STORAGE_TOLERANCE[torch.bfloat16])


@pytest.mark.triton_loops
@given(
    lead=st.sampled_from([(1,), (5,), (2, 7), (40,)]),
    n_cols=st.sampled_from(N_COLS),
    s_dtype=st.sampled_from(DTYPES),
    y_dtype=st.sampled_from(DTYPES),
    grads=st.sampled_from(["out", "low", "both"]),
    p=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_backward_matches_fp64(K, lead, n_cols, s_dtype, y_dtype, grads, p, seed):
    gen = torch.Generator().manual_seed(seed)
    device = kernel_device()
    shape = (*lead, n_cols)
    s = _randn(gen, shape, s_dtype, device)
    weight, bias = (
        _randn(gen, (n_cols,), torch.float32, device),
        _randn(gen, (n_cols,), torch.float32, device),
    )
    d_out = _randn(gen, shape, torch.float32, device) if grads != "low" else None
    d_low = _randn(gen, shape, torch.bfloat16, device) if grads != "out" else None
    keep = (torch.rand(shape, generator=gen) >= p).to(device) if p else None
    d_x = torch.empty(shape, dtype=s_dtype, device=device)
    d_y = torch.empty(shape, dtype=y_dtype, device=device)
    d_w, d_b = K.dropout_add_layer_norm_bwd_launch(d_out, d_low, s, keep, weight, p, EPS, d_x, d_y)

    s64, w64, b64 = (t.double().requires_grad_() for t in (s, weight, bias))
    out = F.layer_norm(s64, shape[-1:], w64, b64, EPS)
    g = sum(t.double() for t in (d_out, d_low) if t is not None)
    want_s, want_w, want_b = torch.autograd.grad(out, (s64, w64, b64), g)
    want_y = want_s * (keep.double() / (1 - p) if p else 1.0)
    torch.testing.assert_close(d_x.double(), want_s, **STORAGE_TOLERANCE[s_dtype])
    # d_y passes through d_x's rounding first (the add hands y its share), then y's
    tol = STORAGE_TOLERANCE[_coarser(s_dtype, y_dtype)]
    torch.testing.assert_close(d_y.double(), want_y, rtol=2 * tol["rtol"], atol=2 * tol["atol"])
    # weight gradients: fp32 sums over the rows of the same fp32 products
    torch.testing.assert_close(d_w.double(), want_w, rtol=1e-4, atol=1e-4 * len(s.view(-1, n_cols)))
    torch.testing.assert_close(d_b.double(), want_b, rtol=1e-4, atol=1e-4 * len(s.view(-1, n_cols)))


def _mask(K, rows, n_cols, p, seed):
    device = kernel_device()
    x = torch.zeros(rows, n_cols, device=device)
    y = torch.ones(rows, n_cols, device=device)
    w, b = torch.ones(n_cols, device=device), torch.zeros(n_cols, device=device)
    keep = torch.empty(rows, n_cols, dtype=torch.bool, device=device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    out = torch.empty_like(x)
    K.dropout_add_layer_norm_fwd_launch(x, y, w, b, seed_t, p, EPS, out, None, None, keep)
    return keep.cpu()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_each_element_with_probability_1_minus_p(K, p):
    keep = _mask(K, 64, 100, p, seed=11)
    n = keep.numel()
    kept = keep.sum().item()
    assert abs(kept - n * (1 - p)) <= 5 * (n * p * (1 - p)) ** 0.5
    # no pattern along rows or columns: every row and column keeps some, drops some
    assert keep.any(0).all() and keep.any(1).all()
    assert (~keep).any(1).all()


def test_dropout_mask_depends_on_the_seed_and_position_only(K):
    first = _mask(K, 37, 48, 0.3, seed=5)
    assert torch.equal(first, _mask(K, 37, 48, 0.3, seed=5))  # reruns are bitwise
    assert not torch.equal(first, _mask(K, 37, 48, 0.3, seed=6))
    # a launch over fewer rows (another grid) gives those rows the same mask
    assert torch.equal(first[:5], _mask(K, 5, 48, 0.3, seed=5))


def test_large_seeds_and_row_counters_past_32_bits_are_fine(K):
    keep = _mask(K, 4, 8, 0.5, seed=2**62 - 1)
    assert 0 < keep.sum() < keep.numel()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(y_shape=(4, 7)), ValueError, "x and y must have one shape"),
        (dict(weight_shape=(5,)), ValueError, r"weight must have shape \(8,\)"),
        (dict(x_dtype=torch.int64), TypeError, "x must be one of"),
        (dict(p=1.0), ValueError, r"dropout probability must be in \[0, 1\)"),
        (dict(n_cols=10_000), ValueError, "normalized size must be in 1..8192"),
    ],
)
def test_bad_inputs_are_clear_errors(K, change, error, match):
    n_cols = change.get("n_cols", 8)
    device = kernel_device()
    x = torch.zeros(4, n_cols, device=device).to(change.get("x_dtype", torch.float32))
    y = torch.zeros(change.get("y_shape", (4, n_cols)), device=device)
    weight = torch.ones(change.get("weight_shape", (n_cols,)), device=device)
    bias = torch.zeros(n_cols, device=device)
    with pytest.raises(error, match=match):
        K.check_dropout_add_layer_norm(x, y, weight, bias, change.get("p", 0.1))


def test_backward_program_count_puts_no_guard_on_a_symbolic_row_count(K):
    # Under torch.compile with dynamic shapes the launcher sees the row count
    # as a SymInt; a Python min() of it became a guard, and a compiled CUDA
    # training step compiled again once the rows crossed the programs an H100
    # keeps resident (4223 rows for the add & norm backward, measured with
    # tools/cuda_codegen_check.py's pretend H100)
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    shape_env = ShapeEnv()
    for rows in (1, 3, 100):  # one program at least; fewer rows than the CPU's 4; more
        n_rows = shape_env.create_unspecified_symint_and_symbol(
            rows, ConstantSource(f"rows_{rows}"), DimDynamic.DYNAMIC
        )
        programs = K.backward_programs(n_rows, 1, 4, torch.device("cpu"))
        assert shape_env.guards == [], f"{rows} rows: {shape_env.guards}"
        # still the count itself, symbolic, and the same on plain ints
        assert isinstance(programs, torch.SymInt) and programs.node.hint == max(1, min(4, rows))
        assert K.backward_programs(rows, 1, 4, torch.device("cpu")) == programs.node.hint
