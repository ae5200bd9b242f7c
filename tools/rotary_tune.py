"""Launch settings of the rotary_qk kernel against the copy bandwidth, on a GPU.

    python tools/rotary_tune.py

Times the forward kernel alone (triton.testing.do_bench, median) at the SIR
shape (B 256, T 800, 4 heads, head_dim 128, bf16) for each (BLOCK_H, num_warps),
on q and k as views of the packed projection and as contiguous tensors, and
prints each as a share of a plain copy of the same bytes. It picks the launch
settings that kernels/rotary.py hard-codes; it is not a test.
"""

from __future__ import annotations

import torch
import triton
from triton.testing import do_bench

from wmfast import functional as WF
from wmfast.kernels import rotary as K


def launch(q, k, cos, sin, q_out, k_out, block_h: int, num_warps: int) -> None:
    batch, seq_len, heads, head_dim = q.shape
    half = head_dim // 2
    strides = [
        K._table_strides(n, t, batch, seq_len, half) for n, t in (("cos", cos), ("sin", sin))
    ]
    K._rotary_qk_kernel[(batch * seq_len, triton.cdiv(heads, block_h))](
        q, k, q_out, k_out, cos, sin,
        seq_len, heads,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        *strides[0], *strides[1],
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_H=block_h, CONJ=False,
        num_warps=num_warps,
    )  # fmt: skip


def main() -> None:
    batch, seq_len, heads, head_dim = 256, 800, 4, 128
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    cos, sin = WF.rotary_tables(seq_len, WF.rotary_inv_freq(head_dim).cuda())
    layouts = {
        "packed": (qkv[:, :, 0], qkv[:, :, 1]),
        "contiguous": (qkv[:, :, 0].contiguous(), qkv[:, :, 1].contiguous()),
    }
    q_out, k_out = (
        torch.empty_like(layouts["contiguous"][0]),
        torch.empty_like(layouts["contiguous"][1]),
    )
    moved = 4 * q_out.numel() * q_out.element_size()  # read q, k; write q', k'
    # a copy of moved / 2 bytes reads and writes moved bytes in all
    src = torch.empty(moved // 2 // 4, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    print(f"copy moving the same bytes: {copy_ms * 1e3:.1f} us, {moved / copy_ms / 1e6:.0f} GB/s")
    current = K.rotary_qk_blocks(head_dim // 2, heads)
    print(f"kernels/rotary.py's choice: BLOCK_H {current[1]}, num_warps 4 (Triton's default)")
    for layout, (q, k) in layouts.items():
        for block_h in (1, 2, 4):
            for num_warps in (1, 2, 4, 8):
                ms = do_bench(
                    lambda q=q, k=k, b=block_h, w=num_warps: launch(
                        q, k, cos, sin, q_out, k_out, b, w
                    ),
                    return_mode="median",
                )
                print(
                    f"{layout:10s} BLOCK_H {block_h} num_warps {num_warps}: {ms * 1e3:7.1f} us "
                    f"{moved / ms / 1e6:6.0f} GB/s  {copy_ms / ms:5.0%} of copy"
                )


if __name__ == "__main__":
    main()
