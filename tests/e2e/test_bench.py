"""The benchmark suite's plumbing: `python -m bench --quick` writes well-formed JSON and Markdown.

    .venv/bin/pytest tests/e2e/test_bench.py

Runs a cheap benchmark in quick mode in a subprocess (with -m slow also one that starts Ray). Checks the shape
of what is written and that one run's figures agree with each other, never how fast anything was: benchmark
figures are for reading, not for asserting.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import REPO

NAMES = ["padding"]  # ray_overhead (the same plumbing with Ray in the child): test_ray_benchmark_is_well_formed


def run_suite(out, names: list[str]):
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), "--only", *names],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return run_suite(tmp_path_factory.mktemp("bench"), NAMES)


def _positive(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_json_is_well_formed(suite):
    stamped = sorted(suite.glob("bench-*.json"))
    assert len(stamped) == 1 and (suite / "latest.json").read_text() == stamped[0].read_text()
    doc = json.loads(stamped[0].read_text())
    assert doc["mode"] == "quick"
    machine = doc["machine"]
    for key in ("cpu", "logical_cores", "ram_gib", "gpu", "versions"):
        assert machine[key] not in (None, ""), key
    assert {"torch", "ray", "vllm", "deepspeed"} <= set(machine["versions"])
    assert list(doc["benchmarks"]) == NAMES
    for name, result in doc["benchmarks"].items():
        assert _positive(result["wall_s"]), name
        if "skipped" in result:  # allowed (e.g. no vLLM), but it must say why
            assert result["skipped"].strip(), name
            continue
        assert result["comparisons"], name
        for c in result["comparisons"]:
            assert {"name", "metric", "baseline", "candidate"} <= set(c), (name, c)
            if "skipped" in c:
                assert c["skipped"].strip(), (name, c)
                continue
            assert _positive(c["baseline_value"]) and _positive(c["ratio"]), (name, c)
            assert c["value"] >= 0 and c["ratio"] == pytest.approx(c["value"] / c["baseline_value"]), (name, c)


@pytest.mark.slow  # 85 s: a Ray pipeline in the child; the plumbing is test_json_is_well_formed's
def test_ray_benchmark_is_well_formed(tmp_path):
    doc = json.loads((run_suite(tmp_path, ["ray_overhead"]) / "latest.json").read_text())
    overhead = doc["benchmarks"]["ray_overhead"]
    assert "skipped" not in overhead and overhead["comparisons"]
    assert overhead["details"]["single"]["steps"] == overhead["details"]["ray"]["steps"] > 0  # the same work


def test_self_play_bench_compares_equal_work(tmp_path):
    """Issue 16's overhead figure is only fair if both sides do the same work: `tspin-ray train` (actors,
    Ray Data stream, broadcast) and the single-process loop must write the same samples and end on the
    same weights. This also pins the whole distributed iteration to a plain loop, bit for bit."""
    from bench.common import meminfo

    doc = json.loads((run_suite(tmp_path, ["self_play"]) / "latest.json").read_text())
    result = doc["benchmarks"]["self_play"]
    assert "skipped" not in result, result
    d = result["details"]
    seq, ray_its = d["sequential"]["iterations"], d["ray_iterations"]
    assert [i["tokens"] for i in seq] == [r["tokens"] for r in ray_its] and d["same_generated_tokens"]
    assert [i["steps"] for i in seq] == [r["steps"] for r in ray_its] == [6, 6]  # 200 rows // 32, 1 epoch
    assert d["max_weight_difference"] < 1e-6
    names = [c["name"] for c in result["comparisons"]]
    assert names[:2] == ["seconds per iteration (iterations 1+)", "whole command"]
    by = {c["name"]: c for c in result["comparisons"]}  # one repeat: the split adds up to the iteration
    steps, rest = by["optimizer steps per iteration (iterations 1+)"], by[
        "per iteration outside the optimizer steps (iterations 1+)"]
    assert steps["baseline_value"] == pytest.approx(sum(seq[1]["step_s_per_epoch"]))  # iteration 1 of 2
    assert steps["value"] == pytest.approx(ray_its[1]["steps_s"])
    for side, iteration in (("baseline_value", seq[1]["seconds"]), ("value", ray_its[1]["timing/iteration"])):
        assert 0 < steps[side] < iteration and steps[side] + rest[side] == pytest.approx(iteration)
    # each side imports torch, loads a model and trains it: over 0.1 GiB each, less than the machine holds
    drawn = by["fresh memory drawn by the command (MemFree's fall)"]
    total = meminfo()["MemTotal"] / 2**30
    assert 0.1 < drawn["baseline_value"] < total and 0.1 < drawn["value"] < total
    (repeat,) = d["memory_drawn_bytes_each_repeat"]
    assert repeat["sequential"] / 2**30 == pytest.approx(drawn["baseline_value"])
    assert repeat["ray"] / 2**30 == pytest.approx(drawn["value"])


def test_markdown_has_the_tables(suite):
    md = (suite / "latest.md").read_text()
    assert md.startswith("# tspin-ray benchmarks (quick)")
    assert "## Machine" in md and "## Summary" in md and "| benchmark | figure | baseline |" in md
    for name in NAMES:
        assert f"## {name}:" in md
    assert "| case | metric | baseline | baseline value | candidate | value | ratio | better |" in md
    assert list(suite.glob("bench-*.md")) and all(list((suite / "logs").glob(f"*-{n}.log")) for n in NAMES)


def test_repeats_overrides_only_the_benchmarks_that_repeat(tmp_path):
    """`python -m bench --repeats N`: the sizes of a benchmark with `repeats` get N, others are left alone."""
    from bench.common import Context

    table = {"quick": {"repeats": 1, "rows": 8}, "full": {"repeats": 5, "rows": 64}}
    assert Context(quick=False, work=tmp_path, repeats=9).sizes(table) == {"repeats": 9, "rows": 64}
    assert Context(quick=True, work=tmp_path, repeats=9).sizes(table) == {"repeats": 9, "rows": 8}
    assert Context(quick=True, work=tmp_path).sizes(table) == {"repeats": 1, "rows": 8}
    assert Context(quick=True, work=tmp_path, repeats=9).sizes({"quick": {"rows": 8}}) == {"rows": 8}
    assert table["quick"]["repeats"] == 1  # the module's table itself is not changed
