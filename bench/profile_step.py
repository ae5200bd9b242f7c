"""Where a training step's GPU time goes: torch.profiler's kernel table for one
model benchmark case, per implementation, side by side in one file.

    python -m bench.profile_step --model transformer/rotary_qk --shape sir \
        --dtype bf16 --impls torch_compile fast --out profile.txt

Each implementation is warmed up (compiled) first, then ``--steps`` steps are
profiled; the table lists kernels by their own CUDA time, per step. It answers
"what limits the fast step" when a speed target is missed (bench/results).

With ``--host`` it profiles the host instead, for launch-bound shapes
("small"), where the GPU waits on Python: cProfile's functions by their own
time over the steps (cProfile slows Python calls, so read shares, not ms).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from wmfast.speed import synchronize

from .bench_models import SHAPES, build_impl, sir_batch, timed_call


def warm_training_step(model: str, shape: str, dtype: str, impl: str):
    """The benchmark's training step for one case, compiled and run a few times."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size, trials, fields = SHAPES[shape]
    batch = sir_batch(batch_size, trials, device)
    step = timed_call(build_impl(model, impl, fields, device), "train_step", batch, dtype)
    for _ in range(3):  # compile, then settle the allocator
        step()
    synchronize(device)
    return step, device


def profile_case(model: str, shape: str, dtype: str, impl: str, steps: int, rows: int) -> str:
    step, device = warm_training_step(model, shape, dtype, impl)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
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


def profile_host(model: str, shape: str, dtype: str, impl: str, steps: int, rows: int) -> str:
    step, device = warm_training_step(model, shape, dtype, impl)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        step()
    synchronize(device)
    profiler.disable()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    return (
        f"== {model} {shape} {dtype} train_step, {impl}: {wall_ms:.2f} ms/step wall under "
        f"cProfile (totals below are over {steps} steps)\n{text.getvalue()}\n"
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
    parser.add_argument("--host", action="store_true", help="cProfile the host instead")
    args = parser.parse_args()
    if not (torch.cuda.is_available() or args.host):
        parser.error("profiling a training step's kernels needs a CUDA device")
    with open(args.out, "a") as out:
        for impl in args.impls:
            profile_one = profile_host if args.host else profile_case
            text = profile_one(args.model, args.shape, args.dtype, impl, args.steps, args.rows)
            print(text.split("\n")[0], flush=True)
            out.write(text)
            out.flush()


if __name__ == "__main__":
    main()
