"""kernels/_triton.py: the checks every launcher shares."""

from __future__ import annotations

import pytest
import torch

from ..helpers import kernel_device

numpy = pytest.importorskip("numpy")  # the interpreter's dependency

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def T():
    from wmfast.kernels import _triton

    return _triton


@pytest.mark.parametrize(
    "interpreted, triton_version, numpy_version, runs",
    [
        (False, "3.6.0", "2.5.5", True),  # compiled kernels: no interpreter involved
        (True, "3.6.0", "2.5.5", False),  # the combination that fails
        (True, "3.6.0", "2.4.1", True),
        (True, "3.7.0", "2.5.5", True),
        (True, "3.9.0", "3.0.0", True),
    ],
)
def test_the_interpreter_runs_loops_except_with_triton_3_6_and_numpy_2_5(
    T, monkeypatch, interpreted, triton_version, numpy_version, runs
):
    monkeypatch.setattr(T, "INTERPRETED", interpreted)
    monkeypatch.setattr(T.triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    assert T._interpreter_runs_loops() is runs


def test_the_norm_backwards_say_why_they_cannot_run(T, monkeypatch):
    from wmfast.kernels import bias_ffn_norms, layer_norm

    monkeypatch.setattr(T, "INTERPRETER_RUNS_LOOPS", False)
    device = kernel_device()
    s = torch.randn(3, 8, device=device)
    w = torch.ones(8, device=device)
    d_x, d_y = torch.full_like(s, 7.0), torch.full_like(s, 7.0)
    match = r"triton < 3.7 .* numpy >= 2.5 refuses\. Install triton >= 3.7 or numpy < 2.5"
    with pytest.raises(RuntimeError, match="dropout_add_layer_norm's backward cannot run"):
        layer_norm.dropout_add_layer_norm_bwd_launch(s, None, s, None, w, 0.0, 1e-5, d_x, d_y)
    with pytest.raises(RuntimeError, match=match):
        bias_ffn_norms.bias_ffn_norms_bwd_launch(
            s, None, s, None, None, w, w, w, w, 0.0, 1e-5, d_x, d_y
        )
    # raised before launching: nothing was written
    assert torch.equal(d_x, torch.full_like(s, 7.0)) and torch.equal(d_y, d_x)


def test_the_launchers_integer_helpers_match_triton_s(T):
    """cdiv and next_power_of_2 replace triton's (slower to call) in the
    launchers: grids and blocks must not change."""
    gen = torch.Generator().manual_seed(20261124)
    ns = [0, 1, 2, 3, 15, 16, 17, 255, 256, 257, 2**31 - 1, 2**31, 2**40 + 3]
    ns += torch.randint(1, 2**20, (200,), generator=gen).tolist()
    for n in ns:
        assert T.next_power_of_2(n) == T.triton.next_power_of_2(n), n
        for d in (1, 2, 3, 4, 16, 64, 1000):
            assert T.cdiv(n, d) == T.triton.cdiv(n, d), (n, d)
