"""Metrics sinks: `metrics.jsonl` (the record of truth) plus TensorBoard scalars in `<run>/tensorboard/`.

    .venv/bin/pytest tests/test_report.py -k metrics
    tensorboard --logdir runs/demo/tensorboard

`RunDir.append_metrics` calls `append_metrics(run_dir, rows)`. Each row is written to metrics.jsonl
(fsync'd) first; the other sinks only mirror it, so a broken sink never loses a row. TensorBoard steps:
a running count of train/sft rows over the whole run (it continues across resumes, being recounted
from metrics.jsonl), and the iteration number for iteration rows (-1 = pi_0 before self-play).
Tags are `<phase>/<metric>` (e.g. `train/loss`, `sft/loss`, `iteration/eval/exact_match`): the phase
prefix keeps a step's `loss` apart from the iteration mean `train/loss`.

Optional mirrors, each only when its package is installed AND its variable is set:
    TSPIN_WANDB_PROJECT=<project>      Weights & Biases (run name = run directory name)
    MLFLOW_TRACKING_URI=<uri>          MLflow (run name = run directory name)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from pathlib import Path

# Bookkeeping fields of a row: they locate a value, they are not values to plot.
NOT_SCALARS = frozenset({"phase", "iteration", "epoch", "step", "time", "rows"})
STEPPED_PHASES = ("train", "sft")


def scalars(row: dict) -> dict[str, float]:
    """The row's plottable values as `<phase>/<metric>` tags; non-numeric and NaN values are dropped."""
    phase = row.get("phase", "misc")
    out = {}
    for key, value in row.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{phase}/{key}"] = float(value)
    return out


def count_stepped_rows(path: Path) -> int:
    """Train/sft rows already in metrics.jsonl: where the running TensorBoard step resumes."""
    if not path.exists():
        return 0
    n = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                n += json.loads(line).get("phase") in STEPPED_PHASES
            except (ValueError, AttributeError):
                continue  # a torn last line of a crashed writer is not a row
    return n


class MetricsWriter:
    """Appends rows to `<run>/metrics.jsonl` and mirrors them to TensorBoard (and W&B / MLflow)."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.path = self.root / "metrics.jsonl"
        self.step = count_stepped_rows(self.path)
        self.sinks = [s for s in (_tensorboard(self.root), _wandb(self.root), _mlflow(self.root)) if s]

    def append(self, rows: list[dict]) -> None:
        self._append_jsonl(rows)
        points = []
        for row in rows:
            if row.get("phase") in STEPPED_PHASES:
                self.step += 1
                step = self.step
            else:
                step = int(row.get("iteration", 0))
            points.append((step, scalars(row)))
        for sink in list(self.sinks):
            try:
                sink.write(points)
            except Exception as e:  # a mirror must never stop training; metrics.jsonl has the rows
                warnings.warn(f"metrics sink {sink.name} failed and is disabled: {e}", stacklevel=2)
                self.sinks.remove(sink)

    def _append_jsonl(self, rows: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:  # closing is best effort (interpreter shutdown, a dead W&B service)
                pass
        self.sinks = []


# One writer per run directory per process, so TensorBoard gets one event file per process, not one per
# call. The size of metrics.jsonl after our last append tells whether anyone else touched the file
# (deleted, truncated, another process appended): then the writer is rebuilt and the step recounted.
_WRITERS: dict[Path, tuple[MetricsWriter, int]] = {}


def append_metrics(run_dir: str | Path, rows: list[dict]) -> None:
    key = Path(run_dir).resolve()
    writer, size = _WRITERS.get(key, (None, -1))
    current = (key / "metrics.jsonl").stat().st_size if (key / "metrics.jsonl").exists() else 0
    if writer is None or current != size:
        if writer is not None:
            writer.close()
        writer = MetricsWriter(key)
    writer.append(rows)
    _WRITERS[key] = (writer, writer.path.stat().st_size)


def close_all() -> None:
    """Flush and close every cached writer (tests; the end of a process)."""
    for writer, _ in _WRITERS.values():
        writer.close()
    _WRITERS.clear()


# ------------------------------------------------------------ sinks
class _TensorBoard:
    name = "tensorboard"

    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir))

    def write(self, points) -> None:
        for step, values in points:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # a crash must not lose what metrics.jsonl already holds

    def close(self) -> None:
        self.writer.close()


class _WandB:
    name = "wandb"

    def __init__(self, root: Path, project: str):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=root.name, dir=str(root), resume="allow", reinit=True)
        # W&B steps must only increase, so iteration rows use their own x axis instead of `step`.
        self.run.define_metric("iteration")
        self.run.define_metric("iteration/*", step_metric="iteration")

    def write(self, points) -> None:
        for step, values in points:
            if not values:
                continue
            if any(k.startswith("iteration/") for k in values):
                self.run.log({**values, "iteration": step})
            else:
                self.run.log({**values, "global_step": step})

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    name = "mlflow"

    def __init__(self, root: Path):
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=root.name, nested=mlflow.active_run() is not None)

    def write(self, points) -> None:
        for step, values in points:
            if values:
                self.mlflow.log_metrics(values, step=step, run_id=self.run.info.run_id)

    def close(self) -> None:
        active = self.mlflow.active_run()
        if active is not None and active.info.run_id == self.run.info.run_id:  # never end a caller's run
            self.mlflow.end_run()


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _make(factory, name: str):
    try:
        return factory()
    except Exception as e:  # missing package, no server: the run goes on with metrics.jsonl
        warnings.warn(f"metrics sink {name} unavailable: {e}", stacklevel=3)
        return None


def _tensorboard(root: Path):
    return _make(lambda: _TensorBoard(root / "tensorboard"), "tensorboard")


def _wandb(root: Path):
    project = os.environ.get("TSPIN_WANDB_PROJECT")
    if not project or not _available("wandb"):
        return None
    return _make(lambda: _WandB(root, project), "wandb")


def _mlflow(root: Path):
    if not os.environ.get("MLFLOW_TRACKING_URI") or not _available("mlflow"):
        return None
    return _make(lambda: _MLflow(root), "mlflow")
