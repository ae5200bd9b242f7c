"""Fast vs reference on the CPU at shapes the benchmarks do not hold.

    python -m bench.cpu_shape_sweep [--shape NAME ...] [--pairs 10] [--train-only]

The CPU benchmark (bench_models.py, "cpu") times one shape; the promise is
wider: the fast variant is never meaningfully slower than the reference
(>= 0.97x). This times bench_models' training step (SIR batch, answers
masked, cross-entropy at the answers, backward, AdamW) and its no-grad
forward of both variants, fp32, in alternating pairs (wmfast.speed), for
every positional type at a few shapes: workingmem's default model, wider and
narrower ones, and long sequences with dropout.
"""

from __future__ import annotations

import argparse

import torch

from wmfast.speed import alternating_medians

from .bench_models import build_impl, sir_batch, timed_call

# name: (batch, trials (x4 tokens), model fields)
SHAPES = {
    "defaults-d512-B8-T128": (8, 32, dict(d_model=512, d_mlp=0, dropout=0.1)),
    "d256-B16-T200": (16, 50, dict(d_model=256, d_mlp=0, dropout=0.1)),
    "d64-B64-T64": (64, 16, dict(d_model=64, d_mlp=256, dropout=0.0)),
    "d128-B4-T800": (4, 200, dict(d_model=128, d_mlp=0, dropout=0.1)),
}
MODELS = ("transformer/rotary_qk", "transformer/rotary", "transformer/standard", "transformer/None")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=list(SHAPES))
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    directions = ("train_step",) if args.train_only else ("train_step", "forward")
    for name in args.shape or SHAPES:
        batch_size, trials, fields = SHAPES[name]
        batch = sir_batch(batch_size, trials, cpu)
        for model in MODELS:
            reference = build_impl(model, "reference", fields, cpu)
            fast = build_impl(model, "fast", fields, cpu)
            for direction in directions:
                ref_call = timed_call(reference, direction, batch, "fp32")
                fast_call = timed_call(fast, direction, batch, "fp32")
                for call in (fast_call, fast_call, ref_call):  # compiles and warm-ups
                    call()
                ref_s, fast_s = alternating_medians(ref_call, fast_call, cpu, args.pairs)
                print(
                    f"{name:22s} {model:22s} {direction:10s} reference {ref_s * 1e3:7.1f} ms  "
                    f"fast {fast_s * 1e3:7.1f} ms  {ref_s / fast_s:.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
