"""Typed records that cross the driver/actor boundary: a training phase's set-up, a step's record, a
weight sync's outcome. Frozen, so what an actor returned is what the driver logs.

    .venv/bin/pytest tests/unit/workers/test_records.py

The metrics rows they become (`StepRecord.row`, `SyncResult.metrics`) keep the keys metrics.jsonl has
always had: reports and resumed runs read them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OptimizerSetup:
    """Trainer.begin's arguments: one training phase's objective, optimizer and learning-rate schedule
    (the controller builds it: controller/trainer_group.py `optimizer_setup`, `sft_setup`)."""
    objective: str
    params: Mapping
    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    warmup_ratio: float
    total_steps: int
    micro_batch_size: int
    global_batch_size: int
    grad_clip: float


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step, as rank 0 reports it: the means over the group of the loss and of the
    objective's own metrics, the lr the step used, and when and how long it ran (rank 0's clock)."""
    step: int
    loss: float
    lr: float
    time: float  # when the step ended
    rows: int  # rows of this rank's micro-batches
    data_wait: float  # seconds the rank waited for those micro-batches
    step_s: float  # seconds of forward, backward and optimizer step
    metrics: Mapping[str, float] = field(default_factory=dict)  # e.g. advantage/real_vs_generated
    epoch: int | None = None  # set by the driver, which knows the epoch

    def means(self) -> dict[str, float]:
        """What an iteration's summary averages over its steps (as `train/<key>`)."""
        return {"loss": self.loss, **self.metrics, "lr": self.lr}

    def row(self) -> dict:
        """The metrics.jsonl row of this step (before the driver adds phase and iteration)."""
        head = {} if self.epoch is None else {"epoch": self.epoch}
        return {**head, **self.means(), "step": self.step, "time": self.time, "rows": self.rows,
                "data_wait": self.data_wait, "step_s": self.step_s}

    def in_epoch(self, epoch: int) -> StepRecord:
        return dataclasses.replace(self, epoch=epoch)


@dataclass(frozen=True)
class ExportResult:
    """Trainer.export: its seconds, and the sha256 and size of every file written (rank 0, the writer;
    {} on the other ranks), keyed by path relative to the checkpoint: the manifest's `files`."""
    seconds: float
    files: Mapping[str, Mapping] = field(default_factory=dict)


@dataclass(frozen=True)
class SendResult:
    """What one trainer rank's part of a weight broadcast did (rank 0 reports bytes and buckets)."""
    seconds: float
    bytes: int
    buckets: int
    error: str | None = None


@dataclass(frozen=True)
class SyncResult:
    """A weight broadcast into the long-lived generators: its seconds, bytes and receiving processes, or
    the first error (the generators then reload the committed checkpoint)."""
    seconds: float = 0.0
    bytes: int = 0
    receivers: int = 0
    error: str | None = None

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.error is None
