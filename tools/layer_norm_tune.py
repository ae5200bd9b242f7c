"""Launch settings of the dropout + add + LayerNorm kernels against the copy
bandwidth, on a GPU.

    python tools/layer_norm_tune.py

Times each kernel alone (triton.testing.do_bench, median) at the SIR shape
under bf16 autocast (B 256, T 800, d 512: fp32 residual x, bf16 block output
y, dropout 0.1, the bf16 copy written forward and its gradient read backward)
for each (BLOCK_M, num_warps) and, backward, programs per SM. Prints each as
a share of a plain copy of the same bytes, beside Inductor's fused kernels
for the same math. It picks the settings kernels/layer_norm.py hard-codes;
it is not a test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from wmfast.kernels import layer_norm as K

BATCH, SEQ_LEN, D_MODEL, P, EPS = 256, 800, 512, 0.1, 1e-5


def forward(x, y, w, b, seed, out, low, s, keep, block_m, warps):
    n_rows = x.shape[0]
    K._dropout_add_layer_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x, y, w, b, seed, out, low, s, keep,
        n_rows, D_MODEL, P, 1.0 / (1.0 - P), EPS,
        D_MODEL, D_MODEL, D_MODEL, D_MODEL, D_MODEL, D_MODEL,
        BLOCK_M=block_m, BLOCK_N=D_MODEL, DROPOUT=True, WRITE_LOW=True, WRITE_SUM=True,
        num_warps=warps,
    )  # fmt: skip


def backward(d_out, d_low, s, keep, w, d_x, d_y, block_m, warps, programs):
    n_rows = s.shape[0]
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), block_m) * block_m
    d_w = torch.empty(programs, D_MODEL, device=s.device)
    d_b = torch.empty_like(d_w)
    K._dropout_add_layer_norm_bwd_kernel[(programs,)](
        d_out, d_low, s, keep, w, d_x, d_y, d_w, d_b,
        n_rows, D_MODEL, rows_per_program, 1.0 / (1.0 - P), EPS,
        D_MODEL, D_MODEL, D_MODEL, D_MODEL, D_MODEL, D_MODEL,
        BLOCK_M=block_m, BLOCK_N=D_MODEL, DROPOUT=True, HAS_D_OUT=True, HAS_D_LOW=True,
        num_warps=warps,
    )  # fmt: skip
    return d_w.sum(0), d_b.sum(0)


def line(name: str, ms: float, moved: int, copy_ms: float) -> str:
    return f"{name:44s} {ms * 1e3:7.1f} us {moved / ms / 1e6:6.0f} GB/s {copy_ms / ms:5.0%} of copy"


def copy_ms_for(moved: int) -> float:
    """A copy that reads and writes ``moved`` bytes in all."""
    src = torch.empty(moved // 2 // 4, device="cuda")
    dst = torch.empty_like(src)
    return do_bench(lambda: dst.copy_(src), return_mode="median")


def main() -> None:
    rows = BATCH * SEQ_LEN
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, D_MODEL, device="cuda", generator=gen)
    y = torch.randn(rows, D_MODEL, device="cuda", generator=gen).bfloat16()
    w = torch.randn(D_MODEL, device="cuda", generator=gen)
    b = torch.randn(D_MODEL, device="cuda", generator=gen)
    seed = torch.tensor([1234], device="cuda")
    out, s = torch.empty_like(x), torch.empty_like(x)
    low, keep = torch.empty_like(y), torch.empty(rows, D_MODEL, device="cuda", dtype=torch.bool)
    d_out, d_low = torch.randn_like(x), torch.randn_like(y)
    d_x, d_y = torch.empty_like(x), torch.empty_like(y)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), f"{sms} SMs, triton {triton.__version__}")

    # forward: read x (4 B) and y (2), write out (4), low (2), s (4), keep (1)
    moved = rows * D_MODEL * 17
    copy_ms = copy_ms_for(moved)
    print(line("copy of the forward's bytes", copy_ms, moved, copy_ms))
    print("kernels/layer_norm.py's choice (BLOCK_M, BLOCK_N, warps):", K.forward_blocks(D_MODEL))
    for block_m in (1, 2, 4, 8):
        for warps in (1, 2, 4, 8, 16):
            args = (x, y, w, b, seed, out, low, s, keep, block_m, warps)
            ms = do_bench(lambda a=args: forward(*a), return_mode="median")
            print(line(f"forward BLOCK_M {block_m} warps {warps}", ms, moved, copy_ms))
    forward(x, y, w, b, seed, out, low, s, keep, 2, 4)  # s and keep for the backward

    # backward: read d_out (4), d_low (2), s (4), keep (1); write d_x (4), d_y (2)
    moved = rows * D_MODEL * 17
    copy_ms = copy_ms_for(moved)
    print(line("copy of the backward's bytes", copy_ms, moved, copy_ms))
    print("kernels/layer_norm.py's choice (BLOCK_M, BLOCK_N, warps):", K.backward_blocks(D_MODEL))
    for block_m in (1, 2, 4, 8):
        for warps in (2, 4, 8, 16):
            for per_sm in (2, 4, 8, 16, 32):
                args = (d_out, d_low, s, keep, w, d_x, d_y, block_m, warps, per_sm * sms)
                ms = do_bench(lambda a=args: backward(*a), return_mode="median")
                name = f"backward BLOCK_M {block_m} warps {warps} {per_sm}/SM"
                print(line(name, ms, moved, copy_ms))

    # Inductor's kernels for the same math (forward; forward + backward)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()

    def composition(x, y, w, b):
        out = F.layer_norm(x + F.dropout(y, P, True), (D_MODEL,), w, b, EPS)
        return out, out.bfloat16()

    compiled = torch.compile(composition, dynamic=False)

    def inductor_fwd():
        with torch.no_grad():
            compiled(x, y, w, b)

    def inductor_fwdbwd():
        o, o_low = compiled(xr, yr, wr, br)
        torch.autograd.backward((o, o_low), (d_out, d_low))
        xr.grad = yr.grad = wr.grad = br.grad = None

    for name, fn in (("Inductor forward", inductor_fwd), ("Inductor fwd+bwd", inductor_fwdbwd)):
        fn()
        ms = do_bench(fn, return_mode="median")
        print(f"{name:44s} {ms * 1e3:7.1f} us")


if __name__ == "__main__":
    main()
