"""One iteration's metrics row: timings, how much generation and training overlapped, step means.

    .venv/bin/pytest tests/e2e/test_driver.py -k "summary or two_iterations"

Times are seconds from the iteration's start (t0, right before its generation is requested). Generation
runs from t0 to its last batch; training from the start of its first step (the first record's end less
its `step_s`) to its end; the iteration from t0 to that end. `timing/overlap` = (generate + train -
iteration) / min(generate, train) is 0 when the first step starts as the last batch is done, 1 when the
shorter ran entirely inside the other, below 0 when there is a gap. `timing/train_wait` sums what rank 0
waited for micro-batches (the `data_wait` of each step record). The stamps come from three clocks (driver,
generator nodes, trainer rank 0): across nodes, clock skew shifts the overlap.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from tspin_ray.workers.records import StepRecord, SyncResult


def iteration_summary(*, t0: float, t_train: float, records: list[StepRecord], table: pa.Table | None,
                      generated_all: bool, rows: int, export_s: float, sync: SyncResult) -> dict:
    """The iteration's metrics row: timings and mean step metrics. `table`: the committed generation
    shards (None for continued SFT); `generated_all`: whether this attempt generated every row (else
    there is no generation time to report); `sync`: the broadcast of pi_{t+1} (empty without one)."""
    gen_tokens = int(np.sum(table.column("gen_tokens").to_numpy())) if table is not None else 0
    done = table.column("gen_done").to_numpy() if table is not None and generated_all else None
    gen_seconds = float(done.max() - t0) if done is not None else 0.0
    train = t_train - (records[0].time - records[0].step_s - t0) if records else 0.0
    summary = {
        "timing/generate": gen_seconds, "timing/train": t_train, "timing/checkpoint": export_s,
        # The engine (re)load a phase paid, or the broadcast of pi_{t+1} into long-lived engines.
        "timing/weight_sync": sync.seconds or (
            float(np.max(table.column("engine_load_s").to_numpy())) if table is not None else 0.0),
        **({"weight_sync/gbps": sync.gbps} if sync.bytes else {}),
        "timing/first_train_step": (records[0].time if records else t0) - t0,
        "timing/last_generation": gen_seconds,
        "timing/first_generation": float(done.min() - t0) if done is not None else 0.0,
        "timing/train_wait": float(sum(r.data_wait for r in records)),
        **({"timing/overlap": (gen_seconds + train - t_train) / min(gen_seconds, train)}
           if gen_seconds > 0 and train > 0 else {}),
        "generate/tokens_per_s": gen_tokens / gen_seconds if gen_seconds > 0 else math.nan,
        "train/rows": rows,
    }
    if table is not None and "generated_valid" in table.column_names:  # a built-in task's checker ran
        # this iteration's own samples (SPIN's mixed-in rows carry the previous iteration's)
        own = max(table.column("source_iteration").to_pylist())
        flags = [v for vs, s in zip(table.column("generated_valid").to_pylist(),
                                    table.column("source_iteration").to_pylist(), strict=True)
                 if vs and s == own for v in vs]
        if flags:
            summary["generate/valid"] = sum(flags) / len(flags)
    for key in sorted({k for r in records for k in r.means()}):
        vals = [r.means()[key] for r in records if key in r.means()]
        summary[f"train/{key}"] = float(np.mean(vals)) if vals else math.nan
    return summary
