"""One iteration's summary: its timings by hand, and the metrics keys it has always written.

    .venv/bin/pytest tests/unit/controller/test_summary.py
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from tspin_ray.controller.summary import iteration_summary
from tspin_ray.workers.records import StepRecord, SyncResult


def test_iteration_summary_overlap_and_waits_by_hand():
    """Generation ends 10 s in; the first step (2 s long) ends 6 s in, training 16 s in: training ran 4-16 s,
    overlap (10 + 12 - 16) / min(10, 12) = 0.6. A first step that starts as generation ends: 0."""
    table = pa.table({"gen_tokens": [30, 50], "gen_done": [104.0, 110.0], "engine_load_s": [0.5, 0.2]})
    records = [StepRecord(step=1, time=106.0, step_s=2.0, data_wait=3.0, loss=1.0, lr=1e-3, rows=8),
               StepRecord(step=2, time=116.0, step_s=2.0, data_wait=1.0, loss=0.5, lr=1e-3, rows=8)]
    summary = iteration_summary(t0=100.0, t_train=16.0, records=records, table=table, generated_all=True, rows=16,
                                export_s=0.3, sync=SyncResult())
    s = summary.row()
    assert summary.overlap == pytest.approx(0.6) and summary.step_means == {"loss": 0.75, "lr": 1e-3}
    assert list(s) == ["timing/generate", "timing/train", "timing/checkpoint", "timing/weight_sync",
                       "timing/first_train_step", "timing/last_generation", "timing/first_generation",
                       "timing/train_wait", "timing/overlap", "generate/tokens_per_s", "train/rows", "train/loss",
                       "train/lr"]  # the metrics.jsonl keys, as they have always been
    assert s["timing/overlap"] == pytest.approx(0.6) and s["timing/train_wait"] == 4.0
    assert s["timing/first_generation"] == 4.0 and s["timing/last_generation"] == s["timing/generate"] == 10.0
    assert s["timing/first_train_step"] == 6.0 and s["generate/tokens_per_s"] == 8.0
    assert s["timing/weight_sync"] == 0.5 and s["train/loss"] == 0.75
    assert "train/data_wait" not in s and "train/step_s" not in s
    seq = iteration_summary(t0=100.0, t_train=16.0, records=[dataclasses.replace(records[0], time=112.0)],
                            table=table, generated_all=True, rows=16, export_s=0.3, sync=SyncResult()).row()
    assert seq["timing/overlap"] == 0.0
    resumed = iteration_summary(t0=100.0, t_train=16.0, records=records, table=table, generated_all=False, rows=16,
                                export_s=0.3, sync=SyncResult(seconds=2.0, bytes=3_000_000_000, receivers=1)).row()
    assert "timing/overlap" not in resumed and resumed["timing/weight_sync"] == 2.0
    assert resumed["weight_sync/gbps"] == 1.5 and resumed["train/lr"] == 1e-3
