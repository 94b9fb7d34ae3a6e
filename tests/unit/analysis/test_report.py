"""`tspin-ray report` and the metrics sinks, on run directories written by hand (no Ray, no training).

    .venv/bin/pytest tests/unit/analysis/test_report.py
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import subprocess
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import CLI, REPO
from tspin_ray.analysis import report
from tspin_ray.errors import UserError
from tspin_ray.rundir import metrics
from tspin_ray.rundir.store import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


# ------------------------------------------------------------ fake run directories
def train_row(objective: str, t: int, epoch: int, step: int, real_lp: float, gen_lp: float) -> dict:
    row = {"phase": "train", "iteration": t, "epoch": epoch, "step": step, "loss": 1.5 - 0.05 * step,
           "lr": 1e-4, "time": 1000.0 + step, "rows": 32, "rewards/real": real_lp, "rewards/generated": gen_lp,
           "rewards/margins": real_lp - gen_lp, "logps/real": real_lp, "logps/generated": gen_lp}
    if objective == "tspin":
        row.update({"advantage/current": real_lp - gen_lp, "advantage/historical": -0.3 * (t + 1),
                    "logps/proto": gen_lp + 0.5})
    return row


def iteration_row(objective: str, t: int, em: float, real_lp: float, gen_lp: float) -> dict:
    row = {"phase": "iteration", "iteration": t, "eval/exact_match": em, "eval/nll": 2.0 - em,
           "timing/eval": 4.0}
    if t < 0:
        return row
    row.update({"timing/generate": 6.0, "timing/train": 24.0, "timing/checkpoint": 0.5,
                "timing/weight_sync": 0.05, "timing/iteration": 30.0, "timing/first_train_step": 6.6,
                "generate/tokens_per_s": NAN, "train/rows": 64, "train/loss": 1.3,
                "train/rewards/real": real_lp, "train/rewards/generated": gen_lp,
                "train/rewards/margins": real_lp - gen_lp,
                "train/logps/real": real_lp, "train/logps/generated": gen_lp})
    if objective == "tspin":
        row.update({"train/advantage/current": real_lp - gen_lp, "train/advantage/historical": -0.3 * (t + 1)})
    return row


def write_shard(path, t: int, gen_lengths: list[int], real_len: int, extra_old: bool = False) -> None:
    """One generation shard of iteration t: two prompts, one sample each (SPIN-style old rows optional)."""
    rows = [{"prompt_id": f"p{i}", "source_iteration": t, "generated": ["x" * n], "gen_tokens": n,
             "real_ids": list(range(real_len)), "generated_ids": [list(range(n))]}
            for i, n in enumerate(gen_lengths)]
    if extra_old:  # last iteration's pair mixed in (SPIN): not a sample of pi_t, must not count
        rows.append({"prompt_id": "p0", "source_iteration": t - 1, "generated": ["y"], "gen_tokens": 100,
                     "real_ids": list(range(real_len)), "generated_ids": [list(range(100))]})
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "part-0.parquet")


def make_run(root, objective="tspin", ems=(0.40, 0.45, 0.55), gen_lp=(-14.0, -15.0), sft_steps=10):
    """A finished run: SFT rows, pi_0 eval, len(ems)-1 iterations of train + iteration rows, shards."""
    root.mkdir(parents=True)
    iterations = len(ems) - 1
    (root / "config.yaml").write_text(yaml.safe_dump(
        {"output_dir": str(root), "seed": 0, "iterations": iterations, "objective": {"name": objective}}))
    (root / "manifest.json").write_text(json.dumps({"entries": {"complete": {"iterations": iterations}}}))
    rows = [{"phase": "sft", "step": s, "loss": 4.0 / s, "lr": 3e-3, "time": 900.0 + s, "nll/real": 4.0 / s,
             "logps/real": -16.0 / s} for s in range(1, sft_steps + 1)]
    rows.append(iteration_row(objective, -1, ems[0], 0, 0))
    for t in range(iterations):
        for epoch in range(2):
            rows += [train_row(objective, t, epoch, epoch * 4 + k, -10.0, gen_lp[t]) for k in range(1, 5)]
        rows.append(iteration_row(objective, t, ems[t + 1], -10.0, gen_lp[t]))
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_shard(root / "generations" / "iter_0", 0, [3, 5], real_len=4)
    write_shard(root / "generations" / "iter_1", 1, [6, 6], real_len=4, extra_old=True)
    return root


def assert_png(path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 1024, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200, path


# ------------------------------------------------------------ report
def test_single_run_report_has_table_plots_and_checks(tmp_path):
    run = make_run(tmp_path / "run_a", gen_lp=(-14.0, -9.0))  # iteration 1: synthetic above real
    out = report.write_report([run])
    assert out == run / "report" / "report.md"
    md = out.read_text()
    assert md.startswith("# tspin-ray report: tspin (run_a)")
    # summary: objective, iterations completed, pi0 / final / best exact match
    assert f"| `{run}` | tspin | 2 of 2 | complete | 0.400 | 0.550 | 0.550 |" in md
    # per-iteration rows carry the numbers of the fake rows
    assert "| pi0 | 0.400 | 1.6000 |" in md
    row1 = next(line for line in md.splitlines() if line.startswith("| 1 |"))
    assert "| 0.550 | 1.4500 | 1.3000 | -1.000 | -0.600 |" in row1
    assert "6.0/4.0" in row1  # lengths from the shard; the mixed-in old pair (100 tokens) is left out
    assert "4.0/4.0" in md
    # the alignment check, per iteration
    assert "iteration 0: yes" in md
    assert "iteration 1: no (reward below, log-likelihood below)" in md
    assert "in not every iteration" in md
    assert "No data for this plot" not in md
    for name in report.PLOTS:
        assert f"![{name}]({name}.png)" in md
        assert_png(run / "report" / f"{name}.png")


def test_comparison_draws_one_line_per_run(tmp_path, monkeypatch):
    a = make_run(tmp_path / "run_a", objective="tspin", ems=(0.40, 0.45, 0.55))
    b = make_run(tmp_path / "run_b", objective="spin", ems=(0.40, 0.30, 0.20))
    figures = {}
    real_save = report.save_figure
    monkeypatch.setattr(report, "save_figure", lambda fig, path: (figures.__setitem__(path.stem, fig),
                                                            real_save(fig, path)))
    out = report.write_report([a, b])
    assert out == a / "report-compare" / "report.md"
    md = out.read_text()
    assert "comparison of 2 runs" in md
    assert "## Per-iteration table: tspin (run_a)" in md and "## Per-iteration table: spin (run_b)" in md
    assert "| spin | 2 of 2 | complete | 0.400 | 0.200 | 0.400 |" in md
    assert len(figures["eval"].axes[0].get_lines()) == 2
    # spin has no advantages: its reward margin is drawn instead (tspin: current + historical)
    assert len([ln for ln in figures["advantages"].axes[0].get_lines() if ln.get_marker() == "o"]) == 3
    for name in report.PLOTS:
        assert_png(a / "report-compare" / f"{name}.png")


def test_run_without_iteration_rows_still_reports(tmp_path):
    run = tmp_path / "early"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"objective": {"name": "tspin"}, "iterations": 3}))
    rows = [{"phase": "sft", "step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "time": 1.0 * s} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"phase": "tr')
    md = report.write_report([run], out_dir=tmp_path / "out").read_text()
    assert "| tspin | 0 of 3 | incomplete | – | – | – |" in md
    assert "No iteration rows in metrics.jsonl yet" in md
    assert "1 unreadable line(s) skipped" in md  # the torn last line of a killed driver
    assert "**No data for this plot:** no eval/exact_match in any iteration row." in md
    assert "## Training loss" in md and "No data for this plot:** no sft" not in md  # SFT loss is there
    for name in report.PLOTS:
        assert_png(tmp_path / "out" / f"{name}.png")


def test_not_a_run_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        report.write_report([tmp_path / "missing"])


def test_timing_segments_add_up_to_the_iteration():
    parts = report.segments({"timing/generate": 6.0, "timing/train": 24.0, "timing/checkpoint": 0.5,
                             "timing/eval": 4.0, "timing/iteration": 30.0})
    assert parts == {"generate": 6.0, "train after generation": 18.0, "checkpoint": 0.5, "eval": 4.0,
                     "other": 1.5}
    assert report.segments({"timing/eval": 3.0, "timing/generate": NAN}) == {
        "generate": 0.0, "train after generation": 0.0, "checkpoint": 0.0, "eval": 3.0, "other": 0.0}


def test_cli_report_prints_the_path(tmp_path):
    run = make_run(tmp_path / "run_a")
    p = subprocess.run([*CLI, "report", "--run", str(run)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"report: {run / 'report' / 'report.md'}"
    p = subprocess.run([*CLI, "report", "--run", str(tmp_path / "nope")], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr


# ------------------------------------------------------------ metrics sinks
def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(autouse=True)
def _close_writers():
    yield
    metrics.close_all()


def test_metrics_writer_mirrors_rows_to_tensorboard(tmp_path):
    w = metrics.MetricsWriter(tmp_path)
    w.append([{"phase": "sft", "step": 1, "loss": 3.0, "time": 5.0}, {"phase": "sft", "step": 2, "loss": 2.5}])
    w.append([{"phase": "iteration", "iteration": -1, "eval/exact_match": 0.25, "eval/nll": NAN,
               "note": "text"}])
    w.append([train_row("tspin", 0, 0, 1, -10.0, -14.0),
              {"phase": "iteration", "iteration": 0, "eval/exact_match": 0.5, "train/loss": 1.25}])
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and math.isnan(rows[2]["eval/nll"])  # the JSONL keeps everything
    got = read_scalars(tmp_path / "tensorboard")
    assert got["iteration/eval/exact_match"] == [(-1, 0.25), (0, 0.5)]
    assert got["sft/loss"] == [(1, 3.0), (2, 2.5)]
    assert got["train/loss"] == [(3, pytest.approx(1.45))]  # a running step across sft and train rows
    assert got["train/advantage/current"] == [(3, 4.0)]
    assert got["iteration/train/loss"] == [(0, 1.25)]  # no collision with the per-step train/loss
    assert "iteration/eval/nll" not in got and "iteration/note" not in got and "sft/time" not in got
    # a resumed process continues the running step from metrics.jsonl
    w2 = metrics.MetricsWriter(tmp_path)
    w2.append([train_row("tspin", 1, 0, 1, -10.0, -14.0)])
    w2.close()
    assert read_scalars(tmp_path / "tensorboard")["train/loss"][-1][0] == 4


def test_rundir_append_metrics_writes_jsonl_and_tensorboard(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics([{"phase": "iteration", "iteration": -1, "eval/exact_match": 0.5}])
    run.append_metrics([{"phase": "iteration", "iteration": 0, "eval/exact_match": 0.75}])
    assert len(run.metrics_path.read_text().splitlines()) == 2
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one cached writer
    assert read_scalars(tmp_path / "tensorboard")["iteration/eval/exact_match"] == [(-1, 0.5), (0, 0.75)]


def test_tensorboard_follows_metrics_pruned_on_resume(tmp_path):
    """A resume drops the rows of uncommitted work; TensorBoard must not keep them beside the redone ones."""
    run = RunDir(tmp_path)
    run.append_metrics([{"phase": "iteration", "iteration": -1, "eval/exact_match": 0.5}])
    run.append_metrics([train_row("tspin", 0, 0, k, -10.0, -14.0) for k in (1, 2, 3)])  # then a crash
    run.prune_metrics(lambda row: row["phase"] == "iteration")
    run.append_metrics([train_row("tspin", 0, 0, 1, -10.0, -12.0)])  # the redone first step
    got = read_scalars(tmp_path / "tensorboard")
    assert got["train/advantage/current"] == [(1, 2.0)]
    assert got["iteration/eval/exact_match"] == [(-1, 0.5)]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_optional_sinks_need_package_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("TSPIN_WANDB_PROJECT", "proj")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///nowhere")
    monkeypatch.setattr(metrics, "_available", lambda name: False)  # neither package installed
    w = metrics.MetricsWriter(tmp_path / "a")
    assert [s.name for s in w.sinks] == ["tensorboard"]
    w.close()

    logged = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: types.SimpleNamespace(log=logged.append, define_metric=lambda *a, **k: None,
                                                   finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(metrics, "_available", lambda name: name == "wandb")
    w = metrics.MetricsWriter(tmp_path / "b")
    w.append([{"phase": "iteration", "iteration": 1, "eval/exact_match": 0.5}])
    w.close()
    assert [s for s in logged] == [{"iteration/eval/exact_match": 0.5, "iteration": 1}]
    monkeypatch.delenv("TSPIN_WANDB_PROJECT")
    assert metrics._wandb(tmp_path / "c") is None  # package there, variable unset: no W&B


def test_lengths_fall_back_to_gen_tokens_and_skip_bad_shards(tmp_path):
    run = make_run(tmp_path / "run_a")
    shard = run / "generations" / "iter_1" / "part-0.parquet"
    pq.write_table(pq.read_table(shard).drop(["generated_ids"]), shard)  # gen_tokens + generated only
    (run / "generations" / "iter_0" / "part-junk.parquet").write_bytes(b"not parquet")
    loaded = report.load_run(run)
    assert loaded.lengths == {0: (4.0, 4.0), 1: (6.0, 4.0)}
    assert loaded.notes == ["generations/iter_0/part-junk.parquet unreadable (ArrowInvalid)"]
