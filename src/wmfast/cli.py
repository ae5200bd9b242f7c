"""The ``wmfast`` command.

wmfast check      run every built-in default model and report (exit 0 = all OK)
wmfast --version
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT = 0, 1, 2


def _cmd_check(args: argparse.Namespace) -> int:
    from wmfast.check import LOGITS_ATOL, LOGITS_RTOL, run_default_checks

    results = run_default_checks(batch=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    header = f"{'model':<24}{'params':>10}  {'logits':<14}{'fused vs unfused':>18}  {'grads':<7}{'time':>7}  ok"
    print(
        f"wmfast check: reference models, batch {args.batch_size}, T {args.seq_len}, seed {args.seed}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        shape = "x".join(map(str, r.logits_shape))
        print(
            f"{r.name:<24}{r.parameters:>10}  {shape:<14}{r.fused_vs_unfused_max_abs:>18.2e}  "
            f"{'finite' if r.grads_finite else 'NaN':<7}{r.seconds:>6.2f}s  {'yes' if r.ok else 'NO'}"
        )
    failed = [r.name for r in results if not r.ok]
    if failed:
        print(f"FAILED: {', '.join(failed)} (tolerance rtol {LOGITS_RTOL}, atol {LOGITS_ATOL})")
        return EXIT_MISMATCH
    print(f"all {len(results)} models OK (tolerance rtol {LOGITS_RTOL}, atol {LOGITS_ATOL})")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from wmfast import __version__

    parser = argparse.ArgumentParser(prog="wmfast", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"wmfast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run the built-in default models and report")
    check.add_argument("--batch-size", type=int, default=4)
    check.add_argument("--seq-len", type=int, default=32)
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=_cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "seq_len"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
