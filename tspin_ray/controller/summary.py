"""One iteration's metrics row: timings, how much generation and training overlapped, step means.

    .venv/bin/pytest tests/unit/controller/test_summary.py

Times are seconds from the iteration's start (t0, right before its generation is requested). Generation
runs from t0 to its last batch; training from the start of its first step (the first record's end less
its `step_s`) to its end; the iteration from t0 to that end. `timing/overlap` = (generate + train -
iteration) / min(generate, train) is 0 when the first step starts as the last batch is done, 1 when the
shorter ran entirely inside the other, below 0 when there is a gap. `timing/train_wait` sums what rank 0
waited for micro-batches (the `data_wait` of each step record). The stamps come from three clocks (driver,
generator nodes, trainer rank 0): across nodes, clock skew shifts the overlap.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa

from tspin_ray.workers.records import StepRecord, SyncResult


@dataclasses.dataclass(frozen=True)
class IterationSummary:
    """One iteration's timings and mean step metrics; `row()` is its metrics.jsonl row, keys as they have
    always been (reports and resumed runs read them)."""
    generate_s: float  # t0 to the last generation batch (0 when this attempt generated nothing)
    train_s: float  # t0 to the end of training
    checkpoint_s: float
    weight_sync_s: float  # the engine (re)load a phase paid, or the broadcast of pi_{t+1} into long-lived engines
    first_train_step_s: float
    first_generation_s: float
    train_wait_s: float  # what rank 0 waited for micro-batches
    tokens_per_s: float
    rows: int
    sync_gbps: float | None = None  # only for a broadcast
    overlap: float | None = None  # only when both generation and training ran
    valid: float | None = None  # the share of samples a built-in task's checker accepts
    step_means: dict = dataclasses.field(default_factory=dict)  # StepRecord.means() averaged over the steps

    def row(self) -> dict:
        return {"timing/generate": self.generate_s, "timing/train": self.train_s, "timing/checkpoint": self.checkpoint_s,
                "timing/weight_sync": self.weight_sync_s,
                **({"weight_sync/gbps": self.sync_gbps} if self.sync_gbps is not None else {}),
                "timing/first_train_step": self.first_train_step_s, "timing/last_generation": self.generate_s,
                "timing/first_generation": self.first_generation_s, "timing/train_wait": self.train_wait_s,
                **({"timing/overlap": self.overlap} if self.overlap is not None else {}),
                "generate/tokens_per_s": self.tokens_per_s, "train/rows": self.rows,
                **({"generate/valid": self.valid} if self.valid is not None else {}),
                **{f"train/{k}": v for k, v in sorted(self.step_means.items())}}


def iteration_summary(*, t0: float, t_train: float, records: list[StepRecord], table: pa.Table | None,
                      generated_all: bool, rows: int, export_s: float, sync: SyncResult) -> IterationSummary:
    """The iteration's timings and mean step metrics. `table`: the committed generation shards (None for
    continued SFT); `generated_all`: whether this attempt generated every row (else there is no generation
    time to report); `sync`: the broadcast of pi_{t+1} (empty without one)."""
    gen_tokens = int(np.sum(table.column("gen_tokens").to_numpy())) if table is not None else 0
    done = table.column("gen_done").to_numpy() if table is not None and generated_all else None
    gen_seconds = float(done.max() - t0) if done is not None else 0.0
    train = t_train - (records[0].time - records[0].step_s - t0) if records else 0.0
    valid = None
    if table is not None and "generated_valid" in table.column_names:  # a built-in task's checker ran
        # this iteration's own samples (SPIN's mixed-in rows carry the previous iteration's)
        own = max(table.column("source_iteration").to_pylist())
        flags = [v for vs, s in zip(table.column("generated_valid").to_pylist(),
                                    table.column("source_iteration").to_pylist(), strict=True)
                 if vs and s == own for v in vs]
        valid = sum(flags) / len(flags) if flags else None
    means = {}
    for key in {k for r in records for k in r.means()}:
        vals = [r.means()[key] for r in records if key in r.means()]
        means[key] = float(np.mean(vals)) if vals else math.nan
    return IterationSummary(
        generate_s=gen_seconds, train_s=t_train, checkpoint_s=export_s,
        weight_sync_s=sync.seconds or (float(np.max(table.column("engine_load_s").to_numpy())) if table is not None
                                       else 0.0),
        sync_gbps=sync.gbps if sync.bytes else None,
        first_train_step_s=(records[0].time if records else t0) - t0,
        first_generation_s=float(done.min() - t0) if done is not None else 0.0,
        train_wait_s=float(sum(r.data_wait for r in records)),
        overlap=(gen_seconds + train - t_train) / min(gen_seconds, train) if gen_seconds > 0 and train > 0 else None,
        tokens_per_s=gen_tokens / gen_seconds if gen_seconds > 0 else math.nan, rows=rows, valid=valid,
        step_means=means)
