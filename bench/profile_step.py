"""Where a training step's GPU time goes: torch.profiler's kernel table for one
model benchmark case, per implementation, side by side in one file.

    python -m bench.profile_step --model transformer/rotary_qk --shape sir \
        --dtype bf16 --impls torch_compile fast --out profile.txt

Each implementation is warmed up (compiled) first, then ``--steps`` steps are
profiled; the table lists kernels by their own CUDA time, per step. It answers
"what limits the fast step" when a speed target is missed (bench/results).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .bench_models import SHAPES, build_impl, sir_batch, timed_call


def profile_case(model: str, shape: str, dtype: str, impl: str, steps: int, rows: int) -> str:
    device = torch.device("cuda")
    batch_size, trials, fields = SHAPES[shape]
    batch = sir_batch(batch_size, trials, device)
    step = timed_call(build_impl(model, impl, fields, device), "train_step", batch, dtype)
    for _ in range(3):  # compile, then settle the allocator
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3 / steps
    launches = sum(e.count for e in events) / steps
    # wide names: Inductor's kernel names list the ops they fuse, which the
    # default width cuts to "triton_per_fused__to_copy_add_native_dropout_..."
    table = prof.key_averages().table(
        sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=120
    )
    return (
        f"== {model} {shape} {dtype} train_step, {impl}: {wall_ms:.2f} ms/step wall "
        f"(profiled), {gpu_ms:.2f} ms/step of kernels, {launches:.0f} kernels/step\n"
        f"(totals below are over {steps} steps)\n{table}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="transformer/rotary_qk")
    parser.add_argument("--shape", default="sir", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--impls", nargs="+", default=["torch_compile", "fast"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("profiling a training step's kernels needs a CUDA device")
    with open(args.out, "a") as out:
        for impl in args.impls:
            text = profile_case(args.model, args.shape, args.dtype, impl, args.steps, args.rows)
            print(text.split("\n")[0], flush=True)
            out.write(text)
            out.flush()


if __name__ == "__main__":
    main()
