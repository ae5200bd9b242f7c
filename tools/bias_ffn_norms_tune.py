"""Launch settings of the fused d_mlp 0 add & norms kernels
(kernels/bias_ffn_norms.py) against the copy bandwidth, on a GPU.

    python tools/bias_ffn_norms_tune.py

Times each kernel alone (triton.testing.do_bench, median) at the SIR shape
under bf16 autocast (B 256, T 800, d 512: fp32 residual x, bf16 attention
output y and feed-forward bias c, dropout 0.1, the bf16 copy written forward
and its gradient read backward) for each (BLOCK_M, num_warps) and, backward,
programs per SM; each as a share of a plain copy of the same bytes. It picks
the settings kernels/bias_ffn_norms.py hard-codes; it is not a test.
"""

from __future__ import annotations

import torch
import triton
from layer_norm_tune import copy_ms_for, line  # tools/ is on the path when run as a script
from triton.testing import do_bench

from wmfast.kernels import bias_ffn_norms as K

BATCH, SEQ_LEN, D_MODEL, P, EPS = 256, 800, 512, 0.1, 1e-5


def forward(t, block_m, warps):
    n_rows = t["x"].shape[0]
    K._bias_ffn_norms_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        t["x"], t["y"], t["w1"], t["b1"], t["c"], t["w2"], t["b2"], t["seeds"],
        t["out"], t["low"], t["s"], t["keep1"], t["keep2"],
        n_rows, D_MODEL, P, 1.0 / (1.0 - P), EPS,
        *(D_MODEL,) * 6,
        BLOCK_M=block_m, BLOCK_N=D_MODEL, DROPOUT=True, WRITE_LOW=True, WRITE_SUM=True,
        num_warps=warps,
    )  # fmt: skip


def backward(t, block_m, warps, programs):
    n_rows = t["s"].shape[0]
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), block_m) * block_m
    parts = torch.empty(len(K.PARAM_GRADS), programs, D_MODEL, device="cuda")
    K._bias_ffn_norms_bwd_kernel[(programs,)](
        t["d_out"], t["d_low"], t["s"], t["keep1"], t["keep2"],
        t["w1"], t["b1"], t["c"], t["w2"], t["d_x"], t["d_y"], parts,
        n_rows, D_MODEL, rows_per_program, programs, 1.0 / (1.0 - P), EPS,
        *(D_MODEL,) * 6,
        BLOCK_M=block_m, BLOCK_N=D_MODEL, DROPOUT=True, HAS_D_OUT=True, HAS_D_LOW=True,
        num_warps=warps,
    )  # fmt: skip
    return parts.sum(1)


def main() -> None:
    rows = BATCH * SEQ_LEN
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    bf16 = torch.bfloat16
    t = dict(x=randn(rows, D_MODEL), y=randn(rows, D_MODEL, dtype=bf16))
    t.update(w1=randn(D_MODEL), b1=randn(D_MODEL), c=randn(D_MODEL, dtype=bf16))
    t.update(w2=randn(D_MODEL), b2=randn(D_MODEL), seeds=torch.tensor([12, 34], device="cuda"))
    t.update(out=torch.empty_like(t["x"]), s=torch.empty_like(t["x"]))
    t.update(low=torch.empty_like(t["y"]))
    t.update(keep1=torch.empty(rows, D_MODEL, device="cuda", dtype=torch.bool))
    t.update(keep2=torch.empty_like(t["keep1"]))
    t.update(d_out=torch.randn_like(t["x"]), d_low=torch.randn_like(t["y"]))
    t.update(d_x=torch.empty_like(t["x"]), d_y=torch.empty_like(t["y"]))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), f"{sms} SMs, triton {triton.__version__}")

    # forward: read x (4 B), y (2); write s (4), keep1, keep2 (1 + 1), out (4), low (2)
    moved = rows * D_MODEL * 18
    copy_ms = copy_ms_for(moved)
    print(line("copy of the forward's bytes", copy_ms, moved, copy_ms))
    print("the launcher's choice (BLOCK_M, BLOCK_N, warps):", K.forward_blocks(D_MODEL))
    for block_m in (1, 2, 4):
        for warps in (2, 4, 8):
            ms = do_bench(lambda b=block_m, w=warps: forward(t, b, w), return_mode="median")
            print(line(f"forward BLOCK_M {block_m} warps {warps}", ms, moved, copy_ms))
    forward(t, 2, 4)  # s and the masks for the backward

    # backward: read d_out (4), d_low (2), s (4), keep1, keep2 (2); write d_x (4), d_y (2)
    moved = rows * D_MODEL * 18
    copy_ms = copy_ms_for(moved)
    print(line("copy of the backward's bytes", copy_ms, moved, copy_ms))
    print("the launcher's choice (BLOCK_M, BLOCK_N, warps):", K.backward_blocks(D_MODEL))
    for block_m in (1, 2):
        for warps in (2, 4, 8):
            for per_sm in (4, 8, 16):
                ms = do_bench(
                    lambda b=block_m, w=warps, n=per_sm * sms: backward(t, b, w, n),
                    return_mode="median",
                )
                name = f"backward BLOCK_M {block_m} warps {warps} {per_sm}/SM"
                print(line(name, ms, moved, copy_ms))


if __name__ == "__main__":
    main()
