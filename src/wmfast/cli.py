"""The ``wmfast`` command.

    wmfast check [SOURCE]   the equivalence report (exit 0: all within tolerance,
                            1: a mismatch, 2: bad input)
    wmfast train --out DIR  train a model on generated Store-Ignore-Recall data
    wmfast --version

SOURCE is a ModelConfig YAML file (one config, a list, or name -> config), a
workingmem run directory (best_model.pth + config.yaml), or nothing: every
built-in default model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT = 0, 1, 2


def _tolerances(args: argparse.Namespace):
    from wmfast.check import TOLERANCES

    if args.rtol is None and args.atol is None:
        return None
    out = {}
    for regime, kinds in TOLERANCES.items():
        out[regime] = {
            kind: (
                args.rtol if args.rtol is not None else rtol,
                args.atol if args.atol is not None else atol,
            )
            for kind, (rtol, atol) in kinds.items()
        }
    return out


def _fast_options(pairs: list[str]):
    """``--option KEY=VALUE`` pairs as FastOptions (None when there are none);
    ValueError names a malformed pair or a bad field or value."""
    if not pairs:
        return None
    from wmfast.fast import FastOptions

    words = {"none": None, "true": True, "false": False}
    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option takes KEY=VALUE (a FastOptions field); got {pair!r}")
        fields[key.strip()] = words.get(value.strip().lower(), value.strip())
    known = {f.name for f in dataclasses.fields(FastOptions)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"--option: no FastOptions field {unknown}; the fields: {sorted(known)}")
    return FastOptions(**fields)


def _chosen_options(options: dict | None) -> str:
    """The FastOptions fields set away from their defaults, as KEY=VALUE."""
    if not options:
        return ""
    from wmfast.fast import FastOptions

    default = dataclasses.asdict(FastOptions())
    return " ".join(f"{k}={v}" for k, v in options.items() if default[k] != v)


def _worst(comparisons, kind):
    found = [c.max_abs for c in comparisons if c.kind == kind]
    return f"{max(found):.1e}" if found else "-"


def _ran(model) -> str:
    ran = model.ran
    if ran.get("variant") != "fast":
        return "reference"
    if ran.get("module_path_reason"):
        return f"module path ({ran['module_path_reason']})"
    if ran.get("attention") == "none (recurrent)":
        # what the check's last call, a training one, ran where it is recorded
        # (below output_layer_eager's size the output layer stays nn.Linear);
        # else what the rules pick with grad
        last = ran.get("last_call") or {}
        training = [
            name
            for key, rule_key, choice, name in (
                ("recurrence", "recurrence_with_grad", "bptt", "bptt"),
                ("output_layer", "output_layer_with_grad", "answer rows", "answer-row output"),
            )
            if last.get(key, ran.get(rule_key)) == choice
        ]
        if training:
            return f"module path; training: {', '.join(training)}"
        return "module path (cuDNN)" if ran.get("device", "").startswith("cuda") else "module path"
    if ran.get("compiled_with_grad"):
        compiled = "compiled"
    elif ran.get("compiled_no_grad"):
        compiled = "compiled no-grad"
    else:
        compiled = "eager"
    parts = [compiled]
    # the no-grad choice, and the training one where the rules differ
    rotary, rotary_training = ran.get("rotary"), ran.get("rotary_with_grad", ran.get("rotary"))
    if rotary != "none":
        training = "" if rotary_training == rotary else f" ({rotary_training} training)"
        parts.append(f"{rotary} rotary{training}")
    norm, norm_training = ran.get("norm", "torch"), ran.get("norm_with_grad", ran.get("norm"))
    if "triton" in (norm, norm_training):
        parts.append("triton norm" if norm == norm_training else f"{norm_training} norm training")
    parts.append(ran.get("attention"))
    return "; ".join(parts)


def _speed(model, name) -> str:
    entry = model.speed.get(name)
    return f"{entry['speedup']:.2f}x" if entry and entry.get("speedup") else "-"


def render(report, console) -> None:
    from rich.table import Table

    s = report.settings
    chosen = _chosen_options(s.get("fast_options"))
    table = Table(
        title=f"wmfast check: {s['variant']} vs reference on {s['device']}, {s['dtype']}, "
        f"batch {s['batch_size']}, T {s['seq_len']}, seeds {s['seeds']}"
        + (f", options {chosen}" if chosen else "")
    )
    table.add_column("model", no_wrap=True)
    table.add_column("ok")
    for column in ("checks", "logits err", "grads err", "paths"):
        table.add_column(column, justify="right")
    table.add_column("ran")
    table.add_column("fwd", justify="right")
    table.add_column("train", justify="right")
    for m in report.models:
        passed = sum(c.ok for c in m.comparisons)
        table.add_row(
            m.name,
            "[green]yes[/]" if m.ok else "[red]NO[/]",
            f"{passed}/{len(m.comparisons)}",
            _worst(m.comparisons, "logits"),
            _worst(m.comparisons, "grad"),
            str(m.paths_checked) if s["paths"] else "off",
            _ran(m),
            _speed(m, "forward"),
            _speed(m, "train_step"),
        )
    console.print(table)
    for m in report.models:
        for note in m.notes:
            console.print(f"[yellow]{m.name}: {note}[/]")
        if not m.ok:
            console.print(f"[red]{m.name}: first diverging module path: {m.first_divergence}[/]")
            for c in m.failures()[:8]:
                console.print(
                    f"  {c.name}: max abs {c.max_abs:.2e}, max rel {c.max_rel:.2e} (rtol {c.rtol}, atol {c.atol})"
                )
    console.print(
        "errors: max abs over all checks (max rel in --json); paths: module paths walked with "
        "nnsight; fwd/train: speedup over the reference in this process (a slowdown is "
        "reported, not failed)"
    )


def _bad_input(reason: str) -> int:
    """One line on stderr (never wrapped: scripts grep it), exit code 2."""
    print(f"wmfast check: {' '.join(reason.split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _cmd_check(args: argparse.Namespace) -> int:
    from rich.console import Console

    from wmfast.check import CheckInputError, check_equivalence
    from wmfast.checkpoint import write_atomic

    # a log file or a pipe gets rich's 80 columns by default: too narrow for the table
    out = Console() if sys.stdout.isatty() else Console(width=160)
    err = Console(stderr=True)
    # the progress display says when a first call compiles; the log line would
    # only break it up
    logging.getLogger("wmfast").setLevel(logging.ERROR)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        return _bad_input(f"--seeds must be comma-separated integers; got {args.seeds!r}")
    try:
        fast_options = _fast_options(args.option)
    except ValueError as exc:
        return _bad_input(str(exc))
    try:
        with err.status("wmfast check: starting") as status:
            report = check_equivalence(
                args.source,
                variant=args.variant,
                device=args.device,
                dtype=args.dtype,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                seeds=seeds,
                tolerances=_tolerances(args),
                paths=not args.no_paths,
                speed=not args.no_speed,
                input_ids=args.inputs,
                fast_options=fast_options,
                progress=lambda msg: status.update(f"wmfast check: {msg}"),
            )
    except CheckInputError as exc:
        return _bad_input(str(exc))
    render(report, out)
    if args.json:
        text = json.dumps(report.to_dict(), indent=2)
        write_atomic(Path(args.json), lambda f: f.write(text.encode("utf-8")))
        out.print(f"report written to {args.json}")
    if report.ok:
        out.print(f"[green]all {len(report.models)} models within tolerance[/]")
        return EXIT_OK
    first = next(m for m in report.models if not m.ok)
    out.print(f"[red]MISMATCH: {first.name} diverges first at {first.first_divergence}[/]")
    return EXIT_MISMATCH


def _cmd_train(args: argparse.Namespace) -> int:
    from wmfast import ModelConfig, ModelWrapper, TrainingConfig
    from wmfast.config import ConfigError
    from wmfast.tasks.sir import SIRConfig, SIRDataset
    from wmfast.training import TrainingError

    try:
        task = dict(seq_len=args.trials, concurrent_reg=args.concurrent_reg, seed=args.seed)
        train_set = SIRDataset(SIRConfig(n_sequences=args.n_train, **task))
        eval_set = SIRDataset(SIRConfig(n_sequences=args.n_eval, **{**task, "seed": args.seed + 1}))
        test_set = SIRDataset(SIRConfig(n_sequences=args.n_eval, **{**task, "seed": args.seed + 2}))
        model_config = ModelConfig(
            model_class=args.model_class,
            positional_embedding_type=None if args.pe == "none" else args.pe,
            d_model=args.d_model,
            n_heads=args.n_heads,
            n_layers=args.n_layers,
            d_mlp=args.d_mlp,
            d_hidden=args.d_hidden,
            act_fn="tanh" if args.model_class == "rnn" else "relu",
            d_vocab=train_set.config.vocab_size,
            dropout=args.dropout,
            seed=args.seed,
        )
        training_config = TrainingConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            checkpoint_dir=args.out,
            seed=args.seed,
            precision=args.precision,
        )
        wrapper = ModelWrapper(model_config, variant=args.variant)
        entry = wrapper.train(
            train_set, training_config, eval_dataset=eval_set, test_dataset=test_set,
            resume=args.resume, overwrite=args.overwrite, progress=sys.stderr.isatty(),
        )  # fmt: skip
    except (ConfigError, ValueError) as exc:
        print(f"wmfast train: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingError as exc:
        print(f"wmfast train: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_MISMATCH
    print(
        f"trained {args.model_class} for {entry['epoch'] + 1} epochs: eval acc {entry['eval_acc']:.3f}, "
        f"test acc {entry['test_acc']:.3f}; run directory {args.out}"
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from wmfast import __version__

    parser = argparse.ArgumentParser(
        prog="wmfast", description="fast, provably equivalent workingmem models"
    )
    parser.add_argument("--version", action="version", version=f"wmfast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="prove a fast model computes what the reference computes")
    check.add_argument(
        "source",
        nargs="?",
        default=None,
        help="config YAML or run directory (default: built-in models)",
    )
    check.add_argument(
        "--variant",
        default="fast",
        choices=["fast", "reference"],
        help="the variant held to the reference (reference: the reference against itself, a self-test)",
    )
    check.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a FastOptions field of the fast model, as you will run it (repeatable): "
        "e.g. --option compile=never --option rotary=torch",
    )
    check.add_argument(
        "--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda or cuda:N"
    )
    check.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="bf16/fp16: autocast vs the fp32 reference",
    )
    # defaults: wmfast.check.DEFAULT_BATCH and DEFAULT_SEQ_LEN (8, 128), not
    # imported here: wmfast --help should not wait for torch
    check.add_argument("--batch-size", type=int, default=8, help="rows of each input (default 8)")
    check.add_argument(
        "--seq-len", type=int, default=128, help="tokens of each input row (default 128)"
    )
    check.add_argument(
        "--seeds", default="0", help="comma-separated seeds for the random token ids"
    )
    check.add_argument(
        "--inputs", default=None, help="a .pt file holding a (batch, seq_len) token-id tensor"
    )
    check.add_argument("--rtol", type=float, default=None, help="override every relative tolerance")
    check.add_argument("--atol", type=float, default=None, help="override every absolute tolerance")
    check.add_argument("--no-paths", action="store_true", help="skip the nnsight module-path walk")
    check.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    check.add_argument("--json", default=None, help="write the full report as JSON here")
    check.set_defaults(func=_cmd_check)

    train = sub.add_parser("train", help="train a model on generated Store-Ignore-Recall data")
    train.add_argument("--out", required=True, help="run directory to write (workingmem's layout)")
    train.add_argument(
        "--model-class", default="transformer", choices=["transformer", "rnn", "lstm"]
    )
    train.add_argument(
        "--pe", default="rotary_qk", choices=["standard", "rotary", "none", "rotary_qk"]
    )
    train.add_argument("--d-model", type=int, default=128)
    train.add_argument("--n-heads", type=int, default=4)
    train.add_argument("--n-layers", type=int, default=2)
    train.add_argument("--d-mlp", type=int, default=0)
    train.add_argument("--d-hidden", type=int, default=128)
    train.add_argument("--dropout", type=float, default=0.0)
    train.add_argument("--epochs", type=int, default=2)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=4e-4)
    train.add_argument("--trials", type=int, default=50, help="trials per sequence (4 tokens each)")
    train.add_argument("--concurrent-reg", type=int, default=2)
    train.add_argument("--n-train", type=int, default=1024)
    train.add_argument("--n-eval", type=int, default=128)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    train.add_argument("--variant", default="fast", choices=["fast", "reference"])
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
