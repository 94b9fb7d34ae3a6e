"""Ray Data stages: prompts -> opponent generation -> triplet rows, streamed to the trainers.

    .venv/bin/pytest tests/unit/rollout/test_pipeline.py

`GenerateStage` is a Ray Data callable class: Ray Data runs it as an autoscaling actor pool between
`generators_min` and `generators_max` (pending batches grow it; on KubeRay that demand adds generator
pods), restarts dead actors and retries their batches a bounded number of times. Each actor loads the
current iterate pi_t from its committed checkpoint, so a new or restarted actor never serves stale
weights. A batch is keyed by (iteration, prompt_id, sample); its rows are also written as one Parquet
shard whose name is a hash of those keys, so a retried batch overwrites its own shard instead of adding
a duplicate, and later epochs or a resumed run read the shards instead of regenerating. Every row
records the checkpoint that generated it (and the engine that scored it), so a resumed run can tell
shards of other weights apart (controller/driver.py sets them aside and regenerates).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from tspin_ray.rollout.phases import row_keys

# Columns of a triplet row (one per prompt and source iteration; k samples each). generated_valid (the
# task checker's verdict per sample) only on a built-in task's rows.
ROW_COLUMNS = ("prompt_id", "source_iteration", "prompt_ids", "real_ids", "generated_ids", "generated",
               "proto_ids", "ref_real", "ref_generated", "gen_tokens", "gen_done", "engine_load_s", "generator",
               "checkpoint", "scorer", "generated_valid")


def shard_name(keys: list[str]) -> str:
    return "part-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20] + ".parquet"


def block_dataset(tables: list[pa.Table]) -> ray.data.Dataset:
    """A dataset of exactly these blocks (one generation batch each), its metadata read here:
    `from_arrow` computes it in remote tasks, which on a fresh cluster first wait for a worker process
    to start (3 s of iteration 0 on a busy 2-core machine)."""
    return ray.data.from_blocks(tables)


def write_shard(table: pa.Table, out_dir: Path, keys: list[str]) -> None:
    """Atomic shard write: temporary name, fsync, rename (a crash never leaves half a shard)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / shard_name(keys)
    tmp = out_dir / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def read_shards(path: Path) -> pa.Table | None:
    """All committed shards of a generation directory as one table (None if there are none)."""
    files = sorted(Path(path).glob("part-*.parquet")) if Path(path).is_dir() else []
    if not files:
        return None
    # "default" promotion: shards written before a column existed (checkpoint, scorer) read as null there
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def done_keys(table: pa.Table | None) -> set[tuple[int, str]]:
    return set(row_keys(table))


def shard_origins(path: Path) -> dict[Path, set[tuple[str, str]]]:
    """(checkpoint, scorer) pairs each shard's rows were made with; ("", "") for shards written before
    rows recorded them (those are trusted: that code always generated with the committed checkpoint)."""
    out = {}
    for f in sorted(Path(path).glob("part-*.parquet")) if Path(path).is_dir() else []:
        names = pq.read_schema(f).names
        if "checkpoint" not in names:
            out[f] = {("", "")}
            continue
        t = pq.read_table(f, columns=["checkpoint", "scorer"])
        out[f] = set(zip(t.column("checkpoint").to_pylist(), t.column("scorer").to_pylist(), strict=True))
    return out


def set_aside(out: Path, usable) -> dict[Path, list]:
    """Move every shard of `out` holding a row whose (checkpoint, scorer) origin `usable` rejects into
    out/stale/; returns {shard: its rejected origins}."""
    stale = {f: sorted(o for o in origins if not usable(o)) for f, origins in shard_origins(out).items()}
    stale = {f: o for f, o in stale.items() if o}
    if stale:
        (out / "stale").mkdir(exist_ok=True)
        for f in stale:
            shutil.move(str(f), str(out / "stale" / f.name))
    return stale


def check_complete(table: pa.Table | None, expected: list[tuple[int, str]], samples: int, what: str) -> None:
    """Every expected (source_iteration, prompt_id) exactly once, with `samples` samples each."""
    got = row_keys(table)
    missing = set(expected) - set(got)
    dupes = len(got) - len(set(got))
    bad = [] if table is None else [n for n in table.column("generated_ids").to_pylist() if len(n) != samples]
    if missing or dupes or bad:
        raise RuntimeError(f"{what}: {len(missing)} rows missing, {dupes} duplicated, "
                           f"{len(bad)} with the wrong number of samples")


