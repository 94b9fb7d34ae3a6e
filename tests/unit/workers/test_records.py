"""The typed records between the driver and its actors keep the metrics keys runs have always logged.

    .venv/bin/pytest tests/unit/workers/test_records.py
"""

from __future__ import annotations

import pickle

import pytest

from tspin_ray.workers.records import OptimizerSetup, StepRecord, SyncResult


def test_a_step_record_becomes_the_metrics_row_runs_have_always_had():
    r = StepRecord(step=3, loss=0.5, lr=1e-5, time=12.0, rows=16, data_wait=0.25, step_s=1.5,
                   metrics={"advantage/real_vs_generated": 2.0, "logps/real": -7.0})
    assert r.row() == {"loss": 0.5, "advantage/real_vs_generated": 2.0, "logps/real": -7.0, "lr": 1e-5, "step": 3,
                       "time": 12.0, "rows": 16, "data_wait": 0.25, "step_s": 1.5}
    assert list(r.in_epoch(1).row())[:2] == ["epoch", "loss"] and r.in_epoch(1).row()["epoch"] == 1
    # what an iteration averages: the loss, the objective's metrics and the lr, never timings or counters
    assert r.means() == {"loss": 0.5, "advantage/real_vs_generated": 2.0, "logps/real": -7.0, "lr": 1e-5}
    with pytest.raises(AttributeError):
        r.loss = 1.0  # frozen: what an actor returned is what the driver logs


def test_sync_result_rate_and_outcome():
    assert SyncResult(seconds=2.0, bytes=3_000_000_000, receivers=2).gbps == 1.5
    assert SyncResult().gbps == 0.0 and SyncResult().ok
    failed = SyncResult(seconds=1.0, error="DistBackendError: peer gone")
    assert not failed.ok and failed.bytes == 0


def test_records_travel_between_processes():
    setup = OptimizerSetup(objective="tspin", params={"beta": 0.1}, optimizer="rmsprop", lr=5e-7, weight_decay=0.0,
                           schedule="linear", warmup_ratio=0.1, total_steps=10, micro_batch_size=8,
                           global_batch_size=64, grad_clip=1.0)
    assert pickle.loads(pickle.dumps(setup)) == setup
