"""The pure-torch rotary math, checked against independent fp64 formulas."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from wmfast import functional as WF


def test_inv_freq_is_the_correctly_rounded_workingmem_formula():
    for dim in (2, 24, 48, 64, 128, 512):
        inv = WF.rotary_inv_freq(dim)
        assert inv.dtype == torch.float32 and inv.shape == (dim // 2,)
        # workingmem rounds the exponent 2j/dim to fp32 first; the rest is exact here
        exponent = (torch.arange(0, dim, 2).float() / dim).double()
        exact = 1.0 / 10000.0**exponent
        # within one fp32 ulp of the exact value
        assert ((inv.double() - exact).abs() <= exact * 2**-23).all()


def test_angles_are_positions_times_inv_freq_in_fp32():
    inv = WF.rotary_inv_freq(16)
    angles = WF.rotary_angles(7, inv)
    assert angles.dtype == torch.float32 and angles.shape == (7, 8)
    assert torch.equal(angles, torch.arange(7.0)[:, None] * inv[None, :])


def test_rotate_half_pairs_i_with_i_plus_half():
    x = torch.arange(6.0)
    assert torch.equal(WF.rotate_half(x), torch.tensor([-3.0, -4.0, -5.0, 0.0, 1.0, 2.0]))


@given(
    st.integers(1, 3),
    st.integers(1, 9),
    st.integers(1, 3),
    st.integers(1, 12),
    st.integers(0, 2**16),
)
def test_rotary_qk_matches_pairwise_rotation_in_fp64(batch, seq_len, heads, half, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, 2 * half, generator=gen)
    k = torch.randn(batch, seq_len, heads, 2 * half, generator=gen)
    cos, sin = WF.rotary_qk_tables(batch, seq_len, WF.rotary_inv_freq(2 * half))
    q_rot, k_rot = WF.rotary_qk(q, k, cos, sin)
    for x, x_rot in ((q, q_rot), (k, k_rot)):
        for t in range(seq_len):
            for j in range(half):
                theta = t * (1.0 / 10000.0 ** (2 * j / (2 * half)))
                a, b = x[:, t, :, j].double(), x[:, t, :, j + half].double()
                torch.testing.assert_close(
                    x_rot[:, t, :, j].double(),
                    a * math.cos(theta) - b * math.sin(theta),
                    rtol=1e-5,
                    atol=1e-5,
                )
                torch.testing.assert_close(
                    x_rot[:, t, :, j + half].double(),
                    b * math.cos(theta) + a * math.sin(theta),
                    rtol=1e-5,
                    atol=1e-5,
                )


@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**16))
def test_rotary_qk_accepts_strided_views_and_broadcast_tables(seq_len, half, seed):
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randn(2, seq_len, 3, 2, 2 * half, generator=gen)  # (B, T, 3, H, D)
    q, k = packed[:, :, 0], packed[:, :, 1]  # non-contiguous views
    cos, sin = WF.rotary_qk_tables(1, seq_len, WF.rotary_inv_freq(2 * half))
    broadcast = (cos.expand(2, -1, -1), sin.expand(2, -1, -1))  # batch stride 0
    got = WF.rotary_qk(q, k, *broadcast)
    want = WF.rotary_qk(q.contiguous(), k.contiguous(), cos.repeat(2, 1, 1), sin.repeat(2, 1, 1))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_rotation_by_minus_angle_undoes_it():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 3, 8, generator=gen)
    cos, sin = WF.rotary_qk_tables(2, 5, WF.rotary_inv_freq(8))
    q_rot, _ = WF.rotary_qk(q, q, cos, sin)
    back, _ = WF.rotary_qk(q_rot, q_rot, cos, -sin)
    torch.testing.assert_close(back, q, rtol=1e-5, atol=1e-5)


def test_embedding_rotation_keeps_dtype_and_does_fp32_math():
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    inv = WF.rotary_inv_freq(8)
    full = WF.embedding_rotation(x, inv)
    low = WF.embedding_rotation(x.bfloat16(), inv)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), full, rtol=2e-2, atol=2e-2)


def test_rotation_of_fp64_keeps_fp64_precision():
    # an fp64 model (a ground truth for fp32 error budgets) must not lose
    # precision in the rotation: only the angles are fp32, as in every dtype
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, 3, 16, dtype=torch.float64, generator=gen)
    cos, sin = WF.rotary_qk_tables(2, 6, WF.rotary_inv_freq(16))
    got, _ = WF.rotary_qk(x, x, cos, sin)
    c, s = cos.double()[:, :, None], sin.double()[:, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    want = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    full = WF.embedding_rotation(x[:, :, 0], WF.rotary_inv_freq(16))
    assert full.dtype == torch.float64
    assert not torch.equal(full, full.float().double())  # not rounded through fp32
