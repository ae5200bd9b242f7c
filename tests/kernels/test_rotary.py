"""The Triton rotary kernels through their launchers: forward values against an
fp64 reference over drawn shapes, dtypes, layouts and tables; clear errors.

On CPU these run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU); on CUDA the same tests run compiled.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from wmfast import functional as WF

from ..helpers import STORAGE_TOLERANCE, kernel_device, rotate_pairs_fp64

pytestmark = pytest.mark.triton

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# head dims: tiny, non-powers of two (48, 80, 96) and the largest supported
HEAD_DIMS = (2, 6, 16, 48, 64, 80, 96, 128, 256)
SEQ_LENS = (1, 2, 3, 5, 7, 13, 16)


@pytest.fixture(scope="module")
def K():
    from wmfast.kernels import rotary

    return rotary


def _qk_views(layout: str, gen, batch, seq_len, heads, head_dim, dtype, device):
    """q and k in one of the layouts the model produces or a user might pass."""
    shape = (batch, seq_len, heads, head_dim)
    if layout == "packed":  # views into the (B, T, 3, H, D) in-projection output
        qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen)
        qkv = qkv.to(device=device, dtype=dtype)
        return qkv[:, :, 0], qkv[:, :, 1]
    q = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if layout == "heads_first":  # (B, H, T, D) memory, seen as (B, T, H, D)
        return q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(
            1, 2
        ).contiguous().transpose(1, 2)
    return q, k


def _tables(kind: str, gen, batch, seq_len, half, device):
    """cos/sin: real per-batch tables, a batch-broadcast view, batch 1, or 2-D."""
    cos, sin = WF.rotary_tables(seq_len, WF.rotary_inv_freq(2 * half))
    if kind == "per_batch":  # distinct rows per sequence, as after an nnsight edit
        jitter = torch.rand(batch, seq_len, half, generator=gen)
        cos, sin = cos * jitter, sin * (1 - jitter)
    elif kind == "expanded":
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    elif kind == "batch1":
        cos, sin = cos[None], sin[None]
    return cos.to(device), sin.to(device)


def _broadcast(table, batch):
    return (
        table
        if table.dim() == 3 and table.shape[0] == batch
        else table.expand(batch, *table.shape[-2:])
    )


@given(
    batch=st.integers(1, 3),
    seq_len=st.sampled_from(SEQ_LENS),
    heads=st.integers(1, 5),
    head_dim=st.sampled_from(HEAD_DIMS),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "packed", "heads_first"]),
    tables=st.sampled_from(["per_batch", "expanded", "batch1", "2d"]),
    conj=st.booleans(),
    inplace=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_rotary_qk_kernel_matches_fp64(
    K, batch, seq_len, heads, head_dim, dtype, layout, tables, conj, inplace, seed
):
    gen = torch.Generator().manual_seed(seed)
    device = kernel_device()
    q, k = _qk_views(layout, gen, batch, seq_len, heads, head_dim, dtype, device)
    cos, sin = _tables(tables, gen, batch, seq_len, head_dim // 2, device)
    c = _broadcast(cos, batch).unsqueeze(-2)
    s = _broadcast(sin, batch).unsqueeze(-2)
    want_q = rotate_pairs_fp64(q, c, -s if conj else s)
    want_k = rotate_pairs_fp64(k, c, -s if conj else s)
    untouched = (q.clone(), k.clone())
    q_out, k_out = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
    K.rotary_qk_launch(q, k, cos, sin, q_out, k_out, conj=conj)
    torch.testing.assert_close(q_out.double(), want_q, **STORAGE_TOLERANCE[dtype])
    torch.testing.assert_close(k_out.double(), want_k, **STORAGE_TOLERANCE[dtype])
    if not inplace:  # inputs stay as they were
        assert torch.equal(q, untouched[0]) and torch.equal(k, untouched[1])


@given(
    batch=st.integers(1, 3),
    seq_len=st.sampled_from(SEQ_LENS),
    heads=st.integers(1, 5),
    head_dim=st.sampled_from(HEAD_DIMS),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "packed", "heads_first"]),
    tables=st.sampled_from(["per_batch", "expanded", "batch1", "2d"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rotary_qk_packed_grad_kernel_matches_fp64(
    K, batch, seq_len, heads, head_dim, dtype, layout, tables, seed
):
    """The packed projection's gradient: d_q and d_k (any layout, as attention's
    backward hands them over) rotated by the negative angle into slots 0 and
    1, d_v copied into slot 2 exactly; the inputs untouched."""
    gen = torch.Generator().manual_seed(seed)
    device = kernel_device()
    d_q, d_k = _qk_views(layout, gen, batch, seq_len, heads, head_dim, dtype, device)
    d_v = torch.randn(batch, seq_len, heads, head_dim, generator=gen).to(device, dtype)
    cos, sin = _tables(tables, gen, batch, seq_len, head_dim // 2, device)
    c = _broadcast(cos, batch).unsqueeze(-2)
    s = _broadcast(sin, batch).unsqueeze(-2)
    untouched = (d_q.clone(), d_k.clone(), d_v.clone())
    out = torch.full((batch, seq_len, 3, heads, head_dim), float("nan"), device=device, dtype=dtype)
    K.rotary_qk_packed_grad_launch(d_q, d_k, d_v, cos, sin, out)
    tolerance = STORAGE_TOLERANCE[dtype]
    torch.testing.assert_close(out[:, :, 0].double(), rotate_pairs_fp64(d_q, c, -s), **tolerance)
    torch.testing.assert_close(out[:, :, 1].double(), rotate_pairs_fp64(d_k, c, -s), **tolerance)
    assert torch.equal(out[:, :, 2], d_v)
    for before, after in zip(untouched, (d_q, d_k, d_v), strict=True):
        assert torch.equal(before, after)


def test_rotary_qk_packed_grad_names_a_wrong_output(K):
    d_q = torch.randn(2, 4, 2, 8, device=kernel_device())
    cos, sin = _tables("2d", torch.Generator().manual_seed(0), 2, 4, 4, kernel_device())
    with pytest.raises(ValueError, match=r"out must be \(2, 4, 3, 2, 8\)"):
        K.rotary_qk_packed_grad_launch(d_q, d_q, d_q, cos, sin, torch.empty(2, 4, 2, 2, 8))
    with pytest.raises(ValueError, match="d_v must be like d_q"):
        K.rotary_qk_packed_grad_launch(d_q, d_q, d_q[:, :3], cos, sin, torch.empty(2, 4, 3, 2, 8))


def test_rotary_qk_in_place_on_packed_leaves_v_alone(K):
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, 3, 2, 8, generator=gen).to(kernel_device())
    before = qkv.clone()
    cos, sin = _tables("expanded", gen, 2, 5, 4, kernel_device())
    K.rotary_qk_launch(qkv[:, :, 0], qkv[:, :, 1], cos, sin, qkv[:, :, 0], qkv[:, :, 1])
    assert torch.equal(qkv[:, :, 2], before[:, :, 2])
    want = rotate_pairs_fp64(before[:, :, 0], cos.unsqueeze(-2), sin.unsqueeze(-2))
    torch.testing.assert_close(qkv[:, :, 0].double(), want, rtol=1e-5, atol=1e-5)


def test_rotating_back_restores_the_input(K):
    gen = torch.Generator().manual_seed(1)
    device = kernel_device()
    q, k = _qk_views("packed", gen, 2, 7, 3, 10, torch.float32, device)
    cos, sin = _tables("per_batch", gen, 2, 7, 5, device)
    cos, sin = cos / (cos**2 + sin**2).sqrt(), sin / (cos**2 + sin**2).sqrt()  # unit rotations
    q1, k1 = torch.empty_like(q), torch.empty_like(k)
    K.rotary_qk_launch(q, k, cos, sin, q1, k1)
    K.rotary_qk_launch(q1, k1, cos, sin, q1, k1, conj=True)
    torch.testing.assert_close(q1, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k1, k, rtol=1e-5, atol=1e-5)


@given(
    batch=st.integers(1, 3),
    seq_len=st.sampled_from(SEQ_LENS),
    d_model=st.sampled_from([2, 8, 24, 48, 64, 130, 256]),
    dtype=st.sampled_from(DTYPES),
    strided=st.booleans(),
    tables=st.sampled_from(["per_batch", "expanded", "batch1", "2d"]),
    add_input=st.booleans(),
    conj=st.booleans(),
    scale=st.sampled_from([1.0, 8.0**0.5, 512.0**0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_embedding_rotation_kernel_matches_fp64(
    K, batch, seq_len, d_model, dtype, strided, tables, add_input, conj, scale, seed
):
    gen = torch.Generator().manual_seed(seed)
    device = kernel_device()
    x = torch.randn(batch, seq_len, d_model + (5 if strided else 0), generator=gen)
    x = x.to(device=device, dtype=dtype)[..., :d_model]  # strided: rows longer than d_model
    cos, sin = _tables(tables, gen, batch, seq_len, d_model // 2, device)
    s_x = x.double() * scale
    want = rotate_pairs_fp64(
        s_x, _broadcast(cos, batch), -_broadcast(sin, batch) if conj else _broadcast(sin, batch)
    )
    if add_input:
        want = want + s_x
    out = torch.empty(x.shape, dtype=dtype, device=device)
    K.embedding_rotation_launch(x, cos, sin, out, scale=scale, add_input=add_input, conj=conj)
    tol = STORAGE_TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol["rtol"], atol=tol["atol"] * scale * 2)


def _guarded(shape, device, fill=7.0):
    """A tensor of ``shape`` in the middle of a buffer of ``fill``, and the buffer:
    a kernel writing outside its output shows as a changed guard."""
    n = torch.Size(shape).numel()
    pool = torch.full((3 * n,), fill, device=device)
    return pool[n : 2 * n].view(shape), pool


def _check_size(device) -> tuple[int, int]:
    """(batch, seq_len): wmfast check's on CUDA; under the CPU's interpreter, a
    size it runs in a second (the guards work the same)."""
    from wmfast.check import DEFAULT_BATCH, DEFAULT_SEQ_LEN

    return (DEFAULT_BATCH, DEFAULT_SEQ_LEN) if device.type == "cuda" else (2, 16)


def _guards_intact(pool, fill=7.0) -> bool:
    n = pool.numel() // 3
    return bool((pool[:n] == fill).all() and (pool[2 * n :] == fill).all())


@pytest.mark.parametrize("conj", [False, True])
def test_embedding_rotation_at_the_check_size_writes_its_output_only(K, conj):
    # wmfast check's size (B 8, T 128, d 64), where the check once reported the
    # "rotary" model's gradients wrong with this op on an H100 (a ReLU kink:
    # backends.COMPILED_TRAINING_EMBEDDING_ROTATION); the drawn shapes above stay
    # far smaller
    gen, device = torch.Generator().manual_seed(5), kernel_device()
    batch, seq_len = _check_size(device)
    x = torch.randn(batch, seq_len, 64, generator=gen).to(device)
    x_before = x.clone()
    cos, sin = WF.rotary_tables(seq_len, WF.rotary_inv_freq(64).to(device))
    out, pool = _guarded(x.shape, device)
    K.embedding_rotation_launch(x, cos, sin, out, scale=8.0, add_input=True, conj=conj)
    s_x = x.double() * 8.0
    want = s_x + rotate_pairs_fp64(s_x, cos[None], -sin[None] if conj else sin[None])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * 8)
    assert _guards_intact(pool)
    assert torch.equal(x, x_before)


def test_rotary_qk_at_the_check_size_writes_its_outputs_only(K):
    gen, device = torch.Generator().manual_seed(6), kernel_device()
    batch, seq_len = _check_size(device)
    qkv = torch.randn(batch, seq_len, 3, 4, 16, generator=gen).to(device)  # d_model 64, 4 heads
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    cos, sin = WF.rotary_tables(seq_len, WF.rotary_inv_freq(16).to(device))
    (q_out, q_pool), (k_out, k_pool) = _guarded(q.shape, device), _guarded(k.shape, device)
    before = qkv.clone()
    K.rotary_qk_launch(q, k, cos[None], sin[None], q_out, k_out)
    for got, x in ((q_out, q), (k_out, k)):
        want = rotate_pairs_fp64(x, cos[None, :, None], sin[None, :, None])
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert _guards_intact(q_pool) and _guards_intact(k_pool)
    assert torch.equal(qkv, before)


# -- clear errors -------------------------------------------------------------------


def _qk(shape=(2, 3, 2, 8), dtype=torch.float32):
    q = torch.randn(shape).to(dtype)
    return q, q.clone()


def _cs(seq_len=3, half=4):
    return WF.rotary_tables(seq_len, WF.rotary_inv_freq(2 * half))


@pytest.mark.parametrize(
    "case, error, message",
    [
        (lambda: (*_qk(dtype=torch.float64), *_cs()), TypeError, "q must be one of"),
        (lambda: (*_qk(dtype=torch.int32), *_cs()), TypeError, "q must be one of"),
        (lambda: (*_qk((2, 3, 2, 258)), *_cs(half=129)), ValueError, "at most 256"),
        (lambda: (*_qk((2, 3, 2, 7)), *_cs(half=3)), ValueError, "must be even"),
        (lambda: (_qk()[0], torch.randn(2, 4, 2, 8), *_cs()), ValueError, "q and k must both be"),
        (
            lambda: (torch.randn(6, 2, 8), torch.randn(6, 2, 8), *_cs()),
            ValueError,
            "q and k must both be",
        ),
        (lambda: (*_qk(), *_cs(seq_len=4)), ValueError, r"cos must have shape \(2, 3, 4\)"),
        (lambda: (*_qk(), _cs()[0].double(), _cs()[1]), TypeError, "cos must be one of"),
        (lambda: (*_qk(), _cs()[0], _cs()[1].to("meta")), ValueError, "one device"),
    ],
)
def test_rotary_qk_bad_input_is_a_clear_error(K, case, error, message):
    q, k, cos, sin = case()
    with pytest.raises(error, match=message):
        K.rotary_qk_launch(q, k, cos, sin, torch.empty_like(q), torch.empty_like(k))


def test_embedding_rotation_bad_input_is_a_clear_error(K):
    cos, sin = _cs(3, 4)
    with pytest.raises(ValueError, match="d_model must be even"):
        K.embedding_rotation_launch(torch.randn(2, 3, 7), cos, sin, torch.empty(2, 3, 7))
    with pytest.raises(ValueError, match=r"\(batch, seq_len, d_model\)"):
        K.embedding_rotation_launch(torch.randn(3, 8), cos, sin, torch.empty(3, 8))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}
    )


def test_cpu_tensors_without_the_interpreter_are_a_clear_error():
    out = _run(
        "import torch\n"
        "from wmfast.kernels.rotary import rotary_qk_launch\n"
        "q = torch.randn(1, 2, 1, 4); c = torch.ones(2, 2)\n"
        "rotary_qk_launch(q, q, c, c, q, q)\n",
        TRITON_INTERPRET="0",
    )
    assert out.returncode != 0
    assert "set TRITON_INTERPRET=1 before wmfast.kernels is imported" in out.stderr
    assert "pure-torch path" in out.stderr


def test_missing_triton_is_a_clear_error():
    out = _run("import sys\nsys.modules['triton'] = None\nimport wmfast.kernels.rotary\n")
    assert out.returncode != 0
    assert "pip install 'wmfast[triton]'" in out.stderr
    assert "wmfast.functional.rotary_qk" in out.stderr


def _compiled_kernels(jit_function) -> int:
    # triton 3.6-3.9: device_caches[device] = (kernel_cache, ...), one entry per compile
    return sum(len(entry[0]) for entry in jit_function.device_caches.values())


@pytest.mark.cuda
def test_kernel_compiles_do_not_grow_with_sequence_length(K):
    device = torch.device("cuda")
    counts = []
    for seq_len in (17, 33, 100, 257, 511, 800, 1023):
        q = torch.randn(2, seq_len, 3, 4, 64, device=device)
        cos, sin = WF.rotary_tables(seq_len, WF.rotary_inv_freq(64).to(device))
        K.rotary_qk_launch(q[:, :, 0], q[:, :, 1], cos, sin, q[:, :, 0], q[:, :, 1])
        counts.append(_compiled_kernels(K._rotary_qk_kernel))
    # one kernel for every length (seq_len and batch strides are not specialised);
    # allow one more for the divisible-by-16 variants of the position strides
    assert counts[-1] <= counts[0] + 1, counts
