"""Launch settings of the rotary_qk kernel against the copy bandwidth, on a GPU.

    python tools/rotary_tune.py

Times the kernel alone (triton.testing.do_bench, median) at the SIR shapes
(B 256, T 800, 4 heads, head_dim 128 and 64, bf16) for each (BLOCK_H,
num_warps): forward on q and k as views of the packed projection, and
backward (the negative angle) on contiguous gradients, as autograd hands
them over. Prints each as a share of a plain copy of the same bytes, then
the op through autograd (forward + backward, as bench/bench_rotary.py times
it) with torch.profiler's kernel table, to tell kernel time from the rest,
and its host time per call (enqueued behind a GPU sleep, so the host never
waits) with cProfile's top functions: where the call is host-bound, that is
what to cut.
It picks the launch settings that kernels/rotary.py hard-codes; it is not a
test.
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch
import triton
from triton.testing import do_bench

from wmfast import functional as WF
from wmfast.kernels import rotary as K
from wmfast.ops import rotary as ops


def launch(q, k, cos, sin, q_out, k_out, block_h: int, num_warps: int, conj: bool) -> None:
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
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_H=block_h, CONJ=conj,
        num_warps=num_warps,
    )  # fmt: skip


def sweep(head_dim: int) -> None:
    batch, seq_len, heads = 256, 800, 4
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    cos, sin = WF.rotary_tables(seq_len, WF.rotary_inv_freq(head_dim).cuda())
    cases = {  # name: (q, k, conj)
        "fwd packed": (qkv[:, :, 0], qkv[:, :, 1], False),
        "bwd contiguous": (qkv[:, :, 0].contiguous(), qkv[:, :, 1].contiguous(), True),
    }
    q_out, k_out = (
        torch.empty_like(cases["bwd contiguous"][0]),
        torch.empty_like(cases["bwd contiguous"][1]),
    )
    moved = 4 * q_out.numel() * q_out.element_size()  # read q, k; write q', k'
    # a copy of moved / 2 bytes reads and writes moved bytes in all
    src = torch.empty(moved // 2 // 4, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    print(f"== head_dim {head_dim}: copy moving the same bytes: {copy_ms * 1e3:.1f} us, "
          f"{moved / copy_ms / 1e6:.0f} GB/s")  # fmt: skip
    current = K.rotary_qk_blocks(head_dim // 2, heads)
    print(f"kernels/rotary.py's choice: BLOCK_H {current[1]}, num_warps {current[2]}")
    for case, (q, k, conj) in cases.items():
        for block_h in (1, 2, 4):
            for num_warps in (1, 2, 4, 8):
                ms = do_bench(
                    lambda q=q, k=k, b=block_h, w=num_warps, c=conj: launch(
                        q, k, cos, sin, q_out, k_out, b, w, c
                    ),
                    return_mode="median",
                )
                print(
                    f"{case:15s} BLOCK_H {block_h} num_warps {num_warps}: {ms * 1e3:7.1f} us "
                    f"{moved / ms / 1e6:6.0f} GB/s  {copy_ms / ms:5.0%} of copy"
                )
    through_autograd(qkv, cos[None], sin[None])


def through_autograd(qkv, cos, sin) -> None:
    """ops.rotary_qk forward + backward as the benchmark times it, and its kernels."""
    q_in, k_in = (qkv[:, :, i].requires_grad_() for i in (0, 1))
    g_q = torch.randn_like(q_in)
    g_k = g_q.flip(0)

    def step():
        q, k = ops.rotary_qk(q_in, k_in, cos, sin)
        torch.autograd.backward((q, k), (g_q, g_k))
        q_in.grad = k_in.grad = None

    step()
    print(f"ops.rotary_qk forward + backward: {do_bench(step, return_mode='median') * 1e3:.1f} us")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60)
    )
    print(f"ops.rotary_qk forward + backward, host time: {host_time(step):.1f} us a call")
    profiler = cProfile.Profile()
    host_time(step, profiler=profiler)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def host_time(step, calls: int = 50, profiler=None) -> float:
    """Microseconds of host work per call of ``step``: the calls are enqueued
    behind a long GPU sleep, so the host never waits for the device."""
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU clock cycles: longer than the calls
    if profiler is not None:
        profiler.enable()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    elapsed = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> None:
    for head_dim in (128, 64):
        sweep(head_dim)


if __name__ == "__main__":
    main()
