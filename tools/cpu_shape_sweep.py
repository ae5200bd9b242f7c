"""Fast vs reference on the CPU at shapes the benchmarks do not hold.

    python tools/cpu_shape_sweep.py [--shape NAME ...] [--pairs 10] [--train-only]

The CPU benchmark (bench/bench_models.py, "cpu") times one shape; the
promise is wider: the fast variant is never meaningfully slower than the
reference (>= 0.97x). This times a workingmem training step (SIR batch,
answers masked, cross-entropy at the answers, backward, AdamW) and an eval
no-grad forward of both variants, in alternating pairs (wmfast.speed), for
every positional type at a few shapes: workingmem's default model, wider and
narrower ones, and long sequences with dropout.
"""

from __future__ import annotations

import argparse

import torch

from wmfast import ModelConfig, build_model
from wmfast.speed import alternating_medians
from wmfast.tasks.sir import SIRConfig, SIRDataset
from wmfast.training import masked_loss, prepare_batch

# name: (batch, trials (x4 tokens), model fields)
SHAPES = {
    "defaults-d512-B8-T128": (8, 32, dict(d_model=512, d_mlp=0, dropout=0.1)),
    "d256-B16-T200": (16, 50, dict(d_model=256, d_mlp=0, dropout=0.1)),
    "d64-B64-T64": (64, 16, dict(d_model=64, d_mlp=256, dropout=0.0)),
    "d128-B4-T800": (4, 200, dict(d_model=128, d_mlp=0, dropout=0.1)),
}
POSITIONAL_TYPES = ("rotary_qk", "rotary", "standard", None)
VOCAB = 350  # SIR's ids for 50 registers and 50 items


def sir_batch(batch: int, trials: int):
    data = SIRDataset(SIRConfig(seq_len=trials, n_sequences=batch, seed=3))
    rows = [data[i] for i in range(batch)]
    stacked = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    return prepare_batch(stacked, VOCAB, mask_answer_tokens=True)


def training_step(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model.train()
        loss, _ = masked_loss(model(batch.input_ids), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def no_grad_forward(model, batch):
    def forward():
        model.eval()
        with torch.no_grad():
            model(batch.input_ids)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=list(SHAPES))
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    directions = {"train": training_step}
    if not args.train_only:
        directions["no-grad"] = no_grad_forward
    for name in args.shape or SHAPES:
        batch_size, trials, fields = SHAPES[name]
        batch = sir_batch(batch_size, trials)
        for pe in POSITIONAL_TYPES:
            config = ModelConfig(positional_embedding_type=pe, d_vocab=VOCAB, seed=1, **fields)
            reference = build_model(config, variant="reference")
            fast = build_model(config, variant="fast")
            for direction, make in directions.items():
                ref_call, fast_call = make(reference, batch), make(fast, batch)
                for call in (fast_call, fast_call, ref_call):  # compiles and warm-ups
                    call()
                ref_s, fast_s = alternating_medians(ref_call, fast_call, cpu, args.pairs)
                print(
                    f"{name:22s} {pe!s:9s} {direction:7s} reference {ref_s * 1e3:7.1f} ms  "
                    f"fast {fast_s * 1e3:7.1f} ms  {ref_s / fast_s:.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
