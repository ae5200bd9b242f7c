"""Turn benchmark results into a markdown table and speedup plots.

    python bench/report.py RESULTS.json [MORE.json|.jsonl ...] --out bench/results/NAME

Reads pytest-benchmark JSON (``--benchmark-json``) or the JSONL that
``WMFAST_BENCH_PARTIAL`` writes. Within each group the first implementation
named ``reference`` (models) or ``torch_eager`` (kernels) is the baseline;
every row shows its median, its speedup over that baseline (measured in the
same run), and GB/s, tokens/s and peak memory where recorded (the
determinism groups have only ``fast`` and ``fast_deterministic``: ``fast`` is
their baseline, and their notes say whether reruns were bitwise; the compile
groups' notes give the per-call time after the first call; where the run
has ``copy`` cases, every GB/s figure is also given as a share of the best
copy bandwidth). CPU model
cases also carry ``alternating``: their speedup over a reference model called
in turn with them, which the machine's slow spells cannot tilt; the plot
shows it where present. Writes
``NAME.md`` and, when matplotlib is installed, ``NAME.png`` (speedup per
case; pip install matplotlib).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

BASELINES = ("reference", "torch_eager", "fast")  # per group, the first of these present


def load(paths: list[Path]) -> list[dict]:
    """Records {name, group, extra_info, stats: {median, ...}} from JSON or JSONL.

    A result found twice (in a run's JSON and in its partial JSONL) counts once.
    """
    records = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            records += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            for bench in json.loads(text)["benchmarks"]:
                records.append(
                    {
                        "name": bench["name"],
                        "group": bench["group"],
                        "extra_info": bench["extra_info"],
                        "stats": bench["stats"],
                    }
                )
    seen: set[tuple[str, str]] = set()
    unique = []
    for record in records:
        key = (record["group"], record["name"])
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


def per_call(record: dict) -> float:
    info = record["extra_info"]
    return info.get("median_per_call_s") or record["stats"]["median"] / info.get(
        "calls_per_round", 1
    )


def copy_bandwidth(records: list[dict]) -> float | None:
    """The best GB/s of the run's ``copy`` cases (bench_rotary's yardstick)."""
    rates = [r["extra_info"].get("gb_per_s") for r in records if r["group"].startswith("copy/")]
    rates = [rate for rate in rates if rate]
    return max(rates) if rates else None


def rows(records: list[dict]) -> list[dict]:
    copy_gbps = copy_bandwidth(records)
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[record["group"]].append(record)
    out = []
    for group in sorted(groups):
        members = groups[group]
        impls = [m["extra_info"].get("impl") for m in members]
        baseline = next((members[impls.index(b)] for b in BASELINES if b in impls), None)
        for m in members:
            info = m["extra_info"]
            seconds = per_call(m)
            out.append(
                dict(
                    group=group,
                    impl=info.get("impl", m["name"]),
                    ms=seconds * 1e3,
                    speedup=(per_call(baseline) / seconds) if baseline else None,
                    alternating=info.get("alternating_speedup"),
                    gbps=info.get("gb_per_s"),
                    tokens=info.get("tokens_per_s"),
                    memory=info.get("peak_memory_bytes"),
                    first_round=info.get("first_round_s"),
                    baseline=m is baseline,
                    notes=_notes(info, None if group.startswith("copy/") else copy_gbps),
                )
            )
    return out


def _notes(info: dict, copy_gbps: float | None) -> str:
    notes = []
    if copy_gbps and info.get("gb_per_s"):
        notes.append(f"{100 * info['gb_per_s'] / copy_gbps:.0f}% of copy bandwidth")
    if "rerun_bitwise" in info:
        notes.append("reruns bitwise" if info["rerun_bitwise"] else "reruns differ")
    if "step_s" in info:  # compile-time cases: the step time the compile buys
        notes.append(f"then {info['step_s'] * 1e3:.1f} ms per call")
    return "; ".join(notes)


def markdown(table: list[dict], environment: dict) -> str:
    head = ", ".join(f"{k} {v}" for k, v in environment.items() if v is not None)
    lines = [
        f"Environment: {head}",
        "",
        "| group | impl | median ms | speedup | alternating | GB/s | tokens/s | peak MiB "
        "| first round s | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def fmt(value, spec, suffix=""):
        return "" if value is None else format(value, spec) + suffix

    for r in table:
        lines.append(
            f"| {r['group']} | {r['impl']} | {r['ms']:.3f} | {fmt(r['speedup'], '.2f', 'x')} "
            f"| {fmt(r['alternating'], '.2f', 'x')} | {fmt(r['gbps'], '.0f')} "
            f"| {fmt(r['tokens'], ',.0f')} | {fmt(r['memory'] and r['memory'] / 2**20, '.0f')} "
            f"| {fmt(r['first_round'], '.1f')} | {r['notes']} |"
        )
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [r for r in table if r["speedup"] is not None and not r["baseline"]]
    speedups = [r["alternating"] or r["speedup"] for r in shown]
    if not shown:
        return False
    labels = [f"{r['group']} · {r['impl']}" for r in shown]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(shown) + 1.5))
    colors = ["tab:green" if x >= 1 else "tab:red" for x in speedups]
    ax.barh(range(len(shown)), speedups, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(
        "speedup over the baseline of its group (alternating where measured, else same run)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument(
        "--out", required=True, type=Path, help="path prefix for NAME.md and NAME.png"
    )
    args = parser.parse_args(argv)
    records = load(args.results)
    if not records:
        parser.error("no benchmark results in the given files")
    first = records[0]["extra_info"]
    environment = {
        k: first.get(k) for k in ("device", "torch", "triton", "cuda", "python", "cpu_threads")
    }
    table = rows(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown(table, environment), encoding="utf-8")
    plotted = plot(table, args.out.with_suffix(".png"))
    print(
        f"wrote {args.out.with_suffix('.md')}"
        + (f" and {args.out.with_suffix('.png')}" if plotted else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
