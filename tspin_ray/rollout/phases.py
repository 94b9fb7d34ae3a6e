"""What travels driver -> generator actor -> GenerateStage: one frozen `GenPhase` per generation phase,
and the prompt rows of that phase as an Arrow table with one fixed schema.

    .venv/bin/pytest tests/unit/rollout/test_pipeline.py

A phase names the checkpoint to generate with and its identity (`checkpoint`, the sha256 that RunDir
computes), so every row written records which weights made it and which engine scored it; a shard
of other weights is never reused (controller/driver.py moves it aside).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa

# The prompt rows handed to a generation phase. proto_ids: the k y0 samples of T-SPIN; given_ids: the k
# responses a SPIN row brings from the previous iteration (re-scored, not sampled). Empty when absent.
PROMPT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("prompt", pa.string()), ("response", pa.string()), ("system", pa.string()),
    ("history", pa.string()), ("source_iteration", pa.int64()),
    ("proto_ids", pa.list_(pa.list_(pa.int64()))), ("given_ids", pa.list_(pa.list_(pa.int64()))),
])


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """How to build a generator's engine (engines.make_engine)."""
    backend: str = "hf"
    dtype: str = "float32"
    trust_remote_code: bool = False
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    sleep_mode: bool = False
    lora_rank: int | None = None  # training.lora.r: vLLM reserves room for adapters of this rank

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the engine constructors (everything but the backend's name)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "backend"}

    @property
    def scorer(self) -> str:
        """Which engine computes reference log-probs: they differ across backends and dtypes."""
        return f"{self.backend}:{self.dtype}"


@dataclasses.dataclass(frozen=True)
class GenPhase:
    """One generation phase: proto (y0 from pi_0), iteration t (y' from pi_t), or evaluation (greedy)."""
    model_path: str
    iteration: int | str
    engine: EngineSpec = EngineSpec()
    seed: int = 0
    samples: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    max_response_tokens: int = 1024
    max_length: int = 1024
    score_ref: bool = False
    out_dir: str | None = None
    checkpoint: str = ""  # RunDir.checkpoint_id of the checkpoint at model_path ("" when not known)
    task: str = ""  # built-in task whose checker marks each sample valid or not (data.task or data.checker)


def phase_for(cfg, model_path, iteration: int | str, *, samples: int, temperature: float, max_new_tokens: int,
              score_ref: bool, out_dir=None, checkpoint: str = "") -> GenPhase:
    """The GenPhase of a run config: sampling and engine settings from `generation`, limits from `training`."""
    c = cfg
    engine = EngineSpec(backend=c.generation.backend, dtype=c.model.dtype, trust_remote_code=c.model.trust_remote_code,
                        gpu_memory_utilization=c.generation.gpu_memory_utilization,
                        tensor_parallel_size=c.generation.tensor_parallel_size,
                        # +1: vLLM scores a prompt only when it is shorter than max_model_len
                        max_model_len=c.training.max_length + 1, sleep_mode=c.generation.colocate,
                        lora_rank=c.training.lora.r if c.training.lora else None)
    return GenPhase(model_path=str(model_path), iteration=iteration, engine=engine, seed=c.seed, samples=samples,
                    max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=c.generation.top_p if temperature > 0 else 1.0,
                    max_response_tokens=c.data.max_response_tokens, max_length=c.training.max_length,
                    score_ref=score_ref, out_dir=str(out_dir) if out_dir else None, checkpoint=checkpoint,
                    task=c.data.task or c.data.checker or "")


def prompt_rows(examples, t: int, proto: dict | None = None, given: dict | None = None) -> pa.Table:
    """The prompt rows of `examples` for source iteration t (proto / given: prompt_id -> k id lists)."""
    return pa.Table.from_pydict({
        "prompt_id": [e.prompt_id for e in examples], "prompt": [e.prompt for e in examples],
        "response": [e.response for e in examples], "system": [e.system for e in examples],
        "history": [e.history for e in examples], "source_iteration": [t] * len(examples),
        "proto_ids": [list(proto[e.prompt_id]) if proto else [] for e in examples],
        "given_ids": [list(given[e.prompt_id]) if given else [] for e in examples],
    }, schema=PROMPT_SCHEMA)


def row_keys(table: pa.Table | None) -> list[tuple[int, str]]:
    """(source_iteration, prompt_id) of every row: what makes a row unique within a phase."""
    if table is None:
        return []
    return list(zip(table.column("source_iteration").to_pylist(), table.column("prompt_id").to_pylist(),
                    strict=True))


def blocks(table: pa.Table, batch_size: int, first: tuple[int, ...] = ()) -> list[pa.Table]:
    """The table cut into slices of the sizes in `first`, then of batch_size: one Ray Data block (and one
    generation batch) each.

    >>> [b.num_rows for b in blocks(pa.table({"a": list(range(10))}), 4, first=(1, 2))]
    [1, 2, 4, 3]
    """
    sizes, start, out = list(first), 0, []
    while start < table.num_rows or not out:
        size = sizes.pop(0) if sizes else batch_size
        out.append(table.slice(start, size))
        start += size
    return out


def ramp(global_batch_size: int, trainers: int, batch_size: int) -> tuple[int, ...]:
    """The first generation batches of a streamed phase: one trainer rank's share of a global batch for
    each rank, so the first optimizer step waits for these small batches, not for full-size ones (Ray
    Data's equal split hands a rank a block only while the blocks still buffered can even the ranks out:
    n ranks start once n blocks are there).

    >>> ramp(64, 2, 256), ramp(64, 1, 32)
    ((32, 32), ())
    """
    share = max(1, global_batch_size // trainers)
    return (share,) * trainers if share < batch_size else ()


def shuffled(rows, seed: int):
    """A seeded permutation of a list or an Arrow table (a cheap, reproducible per-epoch shuffle; Ray
    Data's random_shuffle is an all-to-all exchange that costs seconds even for a few rows)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    return rows.take(order) if hasattr(rows, "take") else [rows[i] for i in order]


def in_row_order(table: pa.Table, rows: pa.Table) -> pa.Table:
    """Shard rows in the order of `rows` (the input order), whichever batches wrote them: a resumed
    iteration then trains on exactly the sequence an uninterrupted one would have."""
    pos = {k: i for i, k in enumerate(row_keys(rows))}
    return table.take(np.argsort([pos[k] for k in row_keys(table)], kind="stable"))
