"""bench/report.py: speedups within a group, markdown, and both input formats."""

from __future__ import annotations

import importlib.util
import json

import pytest

from bench import report


def _bench(name, group, impl, median, **info):
    return {
        "name": name,
        "group": group,
        "stats": {"median": median},
        "extra_info": {"impl": impl, "device": "cpu", "torch": "2.13", **info},
    }


def test_speedups_are_taken_within_each_group(tmp_path):
    data = {
        "benchmarks": [
            _bench("a", "model/train/cpu/fp32/x", "reference", 0.2),
            _bench("b", "model/train/cpu/fp32/x", "fast", 0.1, peak_memory_bytes=2**21),
            _bench(
                "c",
                "rotary_qk/fwd/tiny/float32",
                "torch_eager",
                0.004,
                calls_per_round=2,
                gb_per_s=5.0,
            ),
            _bench("d", "rotary_qk/fwd/tiny/float32", "wmfast_triton", 0.001, calls_per_round=2),
        ]
    }
    (tmp_path / "run.json").write_text(json.dumps(data))
    (tmp_path / "part.jsonl").write_text(
        json.dumps(_bench("e", "model/train/cpu/fp32/x", "torch_compile", 0.4)) + "\n"
    )
    rows = {
        (r["group"], r["impl"]): r
        for r in report.rows(report.load([tmp_path / "run.json", tmp_path / "part.jsonl"]))
    }
    assert rows[("model/train/cpu/fp32/x", "fast")]["speedup"] == pytest.approx(2.0)
    assert rows[("model/train/cpu/fp32/x", "torch_compile")]["speedup"] == pytest.approx(0.5)
    assert rows[("rotary_qk/fwd/tiny/float32", "wmfast_triton")]["ms"] == pytest.approx(
        0.5
    )  # per call
    assert rows[("rotary_qk/fwd/tiny/float32", "wmfast_triton")]["speedup"] == pytest.approx(4.0)
    assert (
        report.main([str(tmp_path / "run.json"), "--out", str(tmp_path / "out" / "summary")]) == 0
    )
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "| model/train/cpu/fp32/x | fast | 100.000 | 2.00x |" in text and "| 2 |" in text
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "summary.png").stat().st_size > 1000


def test_reference_is_the_baseline_wherever_it_is_listed_and_fast_where_it_is_absent(tmp_path):
    data = {
        "benchmarks": [
            _bench("a", "model/train/cpu/fp32/x", "fast", 0.1),
            _bench("b", "model/train/cpu/fp32/x", "reference", 0.3),
            _bench("c", "determinism/train/x", "fast_deterministic", 0.2, rerun_bitwise=True),
            _bench("d", "determinism/train/x", "fast", 0.1, rerun_bitwise=False),
        ]
    }
    (tmp_path / "run.json").write_text(json.dumps(data))
    rows = {(r["group"], r["impl"]): r for r in report.rows(report.load([tmp_path / "run.json"]))}
    assert rows[("model/train/cpu/fp32/x", "fast")]["speedup"] == pytest.approx(3.0)
    assert rows[("model/train/cpu/fp32/x", "reference")]["baseline"]
    assert rows[("determinism/train/x", "fast_deterministic")]["speedup"] == pytest.approx(0.5)
    assert rows[("determinism/train/x", "fast_deterministic")]["notes"] == "reruns bitwise"
    assert rows[("determinism/train/x", "fast")]["notes"] == "reruns differ"


def test_a_result_in_both_the_json_and_the_partial_jsonl_counts_once(tmp_path):
    first = _bench("a", "model/train/cpu/fp32/x", "reference", 0.2)
    (tmp_path / "run.json").write_text(json.dumps({"benchmarks": [first]}))
    (tmp_path / "part.jsonl").write_text(
        json.dumps(first) + "\n" + json.dumps(_bench("b", "model/train/cpu/fp32/x", "fast", 0.1))
    )
    records = report.load([tmp_path / "run.json", tmp_path / "part.jsonl"])
    assert [r["name"] for r in records] == ["a", "b"]


def test_alternating_speedups_get_their_own_column(tmp_path):
    data = {
        "benchmarks": [
            _bench("a", "model/train/cpu/fp32/x", "reference", 0.2),
            _bench("b", "model/train/cpu/fp32/x", "fast", 0.25, alternating_speedup=1.1),
        ]
    }
    (tmp_path / "run.json").write_text(json.dumps(data))
    assert report.main([str(tmp_path / "run.json"), "--out", str(tmp_path / "summary")]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "| fast | 250.000 | 0.80x | 1.10x |" in text
    assert "| reference | 200.000 | 1.00x |  |" in text


def test_kernel_bandwidth_is_noted_as_a_share_of_the_runs_copy_bandwidth(tmp_path):
    data = {
        "benchmarks": [
            _bench("a", "copy/large/bfloat16", "copy", 0.1, gb_per_s=2500.0),
            _bench("b", "rotary_qk/fwdbwd/large/bfloat16", "torch_eager", 0.4, gb_per_s=500.0),
            _bench("c", "rotary_qk/fwdbwd/large/bfloat16", "wmfast_triton", 0.1, gb_per_s=2100.0),
            _bench("d", "model/train/cpu/fp32/x", "reference", 0.2),
        ]
    }
    (tmp_path / "run.json").write_text(json.dumps(data))
    rows = {(r["group"], r["impl"]): r for r in report.rows(report.load([tmp_path / "run.json"]))}
    assert rows[("rotary_qk/fwdbwd/large/bfloat16", "wmfast_triton")]["notes"] == (
        "84% of copy bandwidth"
    )
    assert rows[("rotary_qk/fwdbwd/large/bfloat16", "torch_eager")]["notes"] == (
        "20% of copy bandwidth"
    )
    assert rows[("copy/large/bfloat16", "copy")]["notes"] == ""
    assert rows[("model/train/cpu/fp32/x", "reference")]["notes"] == ""
