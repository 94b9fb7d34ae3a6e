"""Trainer ranks in tests: a set-up, addition rows in context, one step of a group, one rank, one epoch."""

from __future__ import annotations

import pytest
import ray

from tspin_ray.models.checkpoints import load_format
from tspin_ray.workers.records import OptimizerSetup, StepRecord
from tspin_ray.workers.trainer_rank import start_trainers

BEGIN = dict(objective="tspin", params={"alpha": 1.0, "beta": 0.1}, optimizer="adamw", lr=1e-2,
             weight_decay=0.0, schedule="constant", warmup_ratio=0.0, total_steps=1, micro_batch_size=4,
             global_batch_size=8, grad_clip=0.0)


def addition_rows(ckpt) -> list[dict]:
    fmt = load_format(ckpt)
    rows = []
    for i in range(8):
        a, b = 10 + 7 * i, 3 + 11 * i
        x = f"{a}+{b}="
        rows.append({
            "prompt_ids": fmt.prompt_ids(x),
            "real_ids": fmt.response_ids(x, str(a + b)),
            "generated_ids": [fmt.response_ids(x, str(a + b + i + 1))],
            "proto_ids": [fmt.response_ids(x, str(a * 2))],
        })
    return rows


def group_step(ckpt, rows, backend: str, world: int, zero: int = 0, num_gpus: float = 0,
                export_to=None, offload: str = "none", loaded=None, shard_bytes: int | None = None
                ) -> tuple[float, float]:
    """One optimizer step of a `world`-rank group on `rows`; `loaded(actors)` runs right after the load."""
    actors = start_trainers(world, backend, zero, options={"num_cpus": 0.5, "num_gpus": num_gpus}, offload=offload)
    ray.get([a.load.remote(str(ckpt)) for a in actors])
    if loaded is not None:
        loaded(actors)
    ray.get([a.begin.remote(OptimizerSetup(**BEGIN)) for a in actors])
    ds = ray.data.from_items(rows)
    its = ds.streaming_split(world, equal=True)
    records = ray.get([a.train_epoch.remote(it) for a, it in zip(actors, its, strict=True)])
    fingerprints = ray.get([a.state_fingerprint.remote() for a in actors])
    if export_to is not None:
        ray.get([a.export.remote(str(export_to), *([shard_bytes] if shard_bytes else [])) for a in actors])
    for a in actors:
        ray.kill(a)
    assert len(records[0]) == 1 and all(len(r) == 1 for r in records)  # one optimizer step on every rank
    assert fingerprints == pytest.approx([fingerprints[0]] * world, rel=1e-9)  # replicas stay identical
    return records[0][0].loss, fingerprints[0]


def one_rank(ckpt, backend: str, zero: int = 0):
    (actor,) = start_trainers(1, backend, zero, options={"num_cpus": 0.5})
    ray.get(actor.load.remote(str(ckpt)))
    return actor


def epoch_records(actor, rows) -> list[StepRecord]:
    return ray.get(actor.train_epoch.remote(ray.data.from_items(rows).streaming_split(1, equal=True)[0]))
