"""Metrics sinks: `metrics.jsonl` (the record of truth) plus TensorBoard scalars in `<run>/tensorboard/`.

    .venv/bin/pytest tests/unit/analysis/test_report.py -k metrics
    tensorboard --logdir runs/demo/tensorboard

`RunDir.append_metrics` calls `append_metrics(run_dir, rows)`. Each row is written to metrics.jsonl
(fsync'd) first; the other sinks only mirror it, so a broken sink never loses a row. TensorBoard steps:
a running count of train/sft rows over the whole run, and the iteration number for iteration rows
(-1 = pi_0 before self-play). A resume prunes the rows of uncommitted work from metrics.jsonl
(`RunDir.prune_metrics`), so whenever a writer opens it rebuilds `tensorboard/` from metrics.jsonl:
TensorBoard then shows exactly the rows of the file, never the dropped attempt beside the redone one.
Tags are `<phase>/<metric>` (e.g. `train/loss`, `sft/loss`, `iteration/eval/exact_match`): the phase
prefix keeps a step's `loss` apart from the iteration mean `train/loss`.

Optional mirrors, each only when its package is installed AND its variable is set:
    TSPIN_WANDB_PROJECT=<project>      Weights & Biases (run name = run directory name)
    MLFLOW_TRACKING_URI=<uri>          MLflow (run name = run directory name)
"""

from __future__ import annotations

import atexit
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


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl ([] when it does not exist)."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line of a crashed writer is not a row
            if isinstance(row, dict):
                rows.append(row)
    return rows


class MetricsWriter:
    """Appends rows to `<run>/metrics.jsonl` and mirrors them to TensorBoard (and W&B / MLflow)."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.path = self.root / "metrics.jsonl"
        self.root.mkdir(parents=True, exist_ok=True)
        self.step = 0
        self.sinks = [s for s in (_tensorboard(self.root), _wandb(self.root), _mlflow(self.root)) if s]
        # Replay the file into TensorBoard only: W&B and MLflow runs are external records, not mirrors
        # this writer owns, and replaying there would duplicate them.
        self._mirror(self._points(read_rows(self.path)), [s for s in self.sinks if s.name == "tensorboard"])

    def append(self, rows: list[dict]) -> None:
        self._append_jsonl(rows)
        self._mirror(self._points(rows), self.sinks)

    def _points(self, rows: list[dict]) -> list[tuple[int, dict[str, float]]]:
        """(step, scalars) per row; advances the running step over train/sft rows."""
        points = []
        for row in rows:
            if row.get("phase") in STEPPED_PHASES:
                self.step += 1
            t = row.get("iteration")
            is_iteration = row.get("phase") == "iteration" and isinstance(t, int) and not isinstance(t, bool)
            points.append((t if is_iteration else self.step, scalars(row)))
        return points

    def _mirror(self, points, sinks) -> None:
        for sink in list(sinks):
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


# One writer per run directory per process, so TensorBoard gets one event file, not one per call. The
# size of metrics.jsonl after our last append tells whether anyone else touched the file (pruned on
# resume, deleted, another process appended): then the writer is rebuilt, which re-mirrors the file.
_WRITERS: dict[Path, tuple[MetricsWriter, int]] = {}
atexit.register(lambda: close_all())  # flush TensorBoard's writer thread before the interpreter goes


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

        for old in logdir.glob("events.out.tfevents.*"):  # rebuilt from metrics.jsonl (see the top)
            old.unlink()
        self.writer = SummaryWriter(log_dir=str(logdir))

    def write(self, points) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        # One event per row holding all its values: what add_scalar writes one event per value for,
        # about 8x faster, which matters when a resume replays a long metrics.jsonl.
        file_writer = self.writer._get_file_writer()
        for step, values in points:
            if values:
                summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
                file_writer.add_summary(summary, global_step=step)
        self.writer.flush()  # a crash must not lose what metrics.jsonl already holds

    def close(self) -> None:
        self.writer.close()


class _WandB:
    name = "wandb"

    def __init__(self, root: Path, project: str):
        import wandb

        self.run = wandb.init(project=project, name=root.name, dir=str(root))
        # W&B's own step must only increase, and iteration rows start at -1: give each kind its own x axis.
        self.run.define_metric("iteration/*", step_metric="iteration")
        for phase in STEPPED_PHASES:
            self.run.define_metric(f"{phase}/*", step_metric="global_step")

    def write(self, points) -> None:
        for step, values in points:
            if values:
                axis = "iteration" if next(iter(values)).startswith("iteration/") else "global_step"
                self.run.log({**values, axis: step})

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
