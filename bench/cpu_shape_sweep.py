"""Fast vs reference on the CPU at shapes the benchmarks do not hold.

    python -m bench.cpu_shape_sweep [--shape NAME ...] [--pairs 10] [--train-only]
    python -m bench.cpu_shape_sweep --random 40 [--seed 0]

The CPU benchmark (bench_models.py, "cpu") times one shape; the promise is
wider: the fast variant is never meaningfully slower than the reference
(>= 0.97x). This times bench_models' training step (SIR batch, answers
masked, cross-entropy at the answers, backward, AdamW) and its no-grad
forward of both variants, fp32, in alternating pairs (wmfast.speed), for
every positional type at a few shapes: workingmem's default model, wider and
narrower ones, and long sequences with dropout. ``--random N`` draws N cases
instead (any model of the benchmark, width, heads, depth, d_mlp, dropout,
batch, length and direction), for the corners no fixed list thought of.
"""

from __future__ import annotations

import argparse
import random

import torch

from wmfast.speed import alternating_medians

from .bench_models import MODELS as ALL_MODELS
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
    parser.add_argument("--random", type=int, metavar="N", help="draw N cases instead")
    parser.add_argument("--seed", type=int, default=0, help="for --random")
    args = parser.parse_args()
    directions = ("train_step",) if args.train_only else ("train_step", "forward")
    if args.random:
        draw = random.Random(args.seed)
        for _ in range(args.random):
            name, batch_size, trials, fields = random_shape(draw)
            model, direction = draw.choice(ALL_MODELS), draw.choice(directions)
            time_case(name, model, direction, batch_size, trials, fields, args.pairs)
        return
    for name in args.shape or SHAPES:
        batch_size, trials, fields = SHAPES[name]
        for model in MODELS:
            for direction in directions:
                time_case(name, model, direction, batch_size, trials, fields, args.pairs)


def random_shape(draw: random.Random) -> tuple[str, int, int, dict]:
    """A drawn (name, batch, trials, model fields)."""
    d_model = draw.choice([64, 128, 256, 512])
    fields = dict(
        d_model=d_model,
        n_heads=draw.choice([2, 4, 8]),
        n_layers=draw.choice([1, 2, 4]),
        d_mlp=draw.choice([0, 2 * d_model, 4 * d_model]),
        dropout=draw.choice([0.0, 0.1]),
        d_hidden=draw.choice([128, 256]),
    )
    batch_size, trials = draw.choice([1, 4, 16, 32]), draw.choice([2, 10, 32, 50])
    name = "d{d_model}-h{n_heads}-L{n_layers}-mlp{d_mlp}-p{dropout}".format(**fields)
    return f"{name}-B{batch_size}-T{4 * trials}", batch_size, trials, fields


def time_case(name, model, direction, batch_size, trials, fields, pairs) -> None:
    cpu = torch.device("cpu")
    batch = sir_batch(batch_size, trials, cpu)
    reference = build_impl(model, "reference", fields, cpu)
    fast = build_impl(model, "fast", fields, cpu)
    ref_call = timed_call(reference, direction, batch, "fp32")
    fast_call = timed_call(fast, direction, batch, "fp32")
    for call in (fast_call, fast_call, ref_call):  # compiles and warm-ups
        call()
    ref_s, fast_s = alternating_medians(ref_call, fast_call, cpu, pairs)
    print(
        f"{name:22s} {model:22s} {direction:10s} reference {ref_s * 1e3:7.1f} ms  "
        f"fast {fast_s * 1e3:7.1f} ms  {ref_s / fast_s:.2f}x",
        flush=True,
    )


if __name__ == "__main__":
    main()
