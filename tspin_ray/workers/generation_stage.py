"""The generation stage: opponent generation (and reference scoring) of one prompt batch, as a Ray Data
actor pool.

    .venv/bin/pytest tests/unit/rollout/test_pipeline.py

`GenerateStage` is a Ray Data callable class: Ray Data runs it as an autoscaling actor pool between
`generators_min` and `generators_max` (pending batches grow it; on KubeRay that demand adds generator
pods), restarts dead actors and retries their batches a bounded number of times. Each actor loads the
current iterate pi_t from its committed checkpoint, so a new or restarted actor never serves stale
weights. Every row records the checkpoint that generated it (and the engine that scored it); its shard
goes to disk through rollout/shards.py.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from tspin_ray.algorithms.inputs import to_list
from tspin_ray.data.tasks import get_task
from tspin_ray.faults import crash_if
from tspin_ray.models.chat_format import response_budget
from tspin_ray.rollout.phases import GenPhase, blocks
from tspin_ray.rollout.seeds import sample_seed
from tspin_ray.rollout.shards import block_dataset, write_shard
from tspin_ray.workers.engines import make_engine


class GenerateStage:
    """Opponent generation for one batch of prompts (and reference scoring for SPIN/SPACE)."""

    def __init__(self, phase: GenPhase):

        t0 = time.time()
        self.engine = make_engine(phase.engine.backend, phase.model_path, seed=phase.seed, **phase.engine.kwargs())
        self.load_seconds = time.time() - t0
        self.format = self.engine.format  # the checkpoint's ChatFormat, loaded once by the engine
        node = ray.get_runtime_context().get_node_id()[:8] if ray.is_initialized() else "local"
        self.name = f"{node}:{os.getpid()}"  # which actor made a row
        self.phase = phase

    def set_phase(self, phase: GenPhase) -> None:
        """What to do with the next batches (a long-lived generator serves many phases)."""
        self.phase = phase

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:

        fmt, ph = self.format, self.phase
        ids = [str(x) for x in batch["prompt_id"]]
        crash_if("engine", ids)  # chaos tests: a prompt that always kills its engine
        source = [int(x) for x in batch["source_iteration"]]
        pairs = [fmt.example_ids(str(p), str(r), str(s), ph.max_response_tokens, ph.max_length, str(h))
                 for p, r, s, h in zip(batch["prompt"], batch["response"], batch["system"], batch["history"],
                                       strict=True)]
        prompt_ids, real_ids = [p for p, _ in pairs], [y for _, y in pairs]
        # One truncation rule for y, y' and y0 (chat_format.response_budget): prompt + response <= max_length.
        budget = [response_budget(len(p), ph.max_response_tokens, ph.max_length) for p in prompt_ids]
        given = to_list(batch["given_ids"])
        k = ph.samples
        # Rows with given responses (SPIN's mixed-in previous pairs) are only re-scored under pi_t.
        todo = [(i, s) for i in range(len(ids)) if not given[i] for s in range(k)]
        outs = self.engine.generate([prompt_ids[i] for i, _ in todo],
                                    [sample_seed(ph.seed, ph.iteration, ids[i], s) for i, s in todo],
                                    max_new_tokens=ph.max_new_tokens, temperature=ph.temperature,
                                    top_p=ph.top_p) if todo else []
        generated = [list(g) for g in given]
        for (i, _), o in zip(todo, outs, strict=True):  # an empty sample still needs a token: the end of turn
            generated[i].append(fmt.cut(o)[:budget[i]] or [fmt.end_of_turn])
        ref_real = [float("nan")] * len(ids)
        ref_gen = [[float("nan")] * k for _ in ids]
        if ph.score_ref:
            ref_real = self.engine.score(prompt_ids, real_ids)
            flat = self.engine.score([prompt_ids[i] for i in range(len(ids)) for _ in range(k)],
                                     [g for gs in generated for g in gs])
            ref_gen = [flat[i * k:(i + 1) * k] for i in range(len(ids))]
        proto = to_list(batch["proto_ids"])
        out = {
            "prompt_id": ids, "source_iteration": source, "prompt_ids": prompt_ids, "real_ids": real_ids,
            "generated_ids": generated,
            "generated": [[fmt.decode(g) for g in gs] for gs in generated],
            "proto_ids": proto, "ref_real": ref_real, "ref_generated": ref_gen,
            "gen_tokens": [sum(len(g) for g in gs) for gs in generated],
            "gen_done": [time.time()] * len(ids), "engine_load_s": [self.load_seconds] * len(ids),
            "generator": [self.name] * len(ids), "checkpoint": [ph.checkpoint] * len(ids),
            "scorer": [ph.engine.scorer if ph.score_ref else ""] * len(ids),
        }
        if ph.task:  # the verifier of objective rft, and generate/valid in the metrics

            task = get_task(ph.task)
            # valid = an accepted answer written as the ids y would have (RFT trains on these ids; the
            # exact metrics of study/distribution.py score the same ids), ending with its end of turn
            out["generated_valid"] = [
                [task.check(str(p), text) and ids == fmt.response_ids(str(p), text.strip(), str(s), history=str(h))
                 for ids, text in zip(gs, texts, strict=True)]
                for p, s, h, gs, texts in zip(batch["prompt"], batch["system"], batch["history"], generated,
                                              out["generated"], strict=True)]
        if ph.out_dir is not None:
            write_shard(pa.Table.from_pydict(out), Path(ph.out_dir), [f"{s}:{i}" for s, i in zip(source, ids, strict=False)])
        return out


def generation_dataset(rows: pa.Table, phase: GenPhase, *, batch_size: int, min_actors: int, max_actors: int,
                       num_cpus: float, num_gpus: float, resources: dict, max_attempts: int,
                       first: tuple[int, ...] = ()) -> ray.data.Dataset:
    """Lazy dataset of triplet rows generated from prompt `rows` (phases.PROMPT_SCHEMA), one batch per
    block (`first`: the sizes of the first blocks, phases.ramp). Nothing runs until a consumer pulls."""
    ds = block_dataset(blocks(rows, batch_size, first))
    # Bounded restarts and retries: Ray Data's default is unlimited, so an engine that always crashes
    # on one batch would loop forever. Extra kwargs are still Ray 2.60's only way to say so (it warns
    # that they go away in 2.64).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        # One block per call (batch_size None: no bundling, so the small first blocks stay small).
        # map_batches refuses batch_size None with GPUs; map_batches_internal is the same call without that
        # check (Ray's own map_groups uses it for the same reason, Ray 2.60).
        return ds.map_batches_internal(
            GenerateStage, batch_size=None, batch_format="numpy", fn_constructor_args=(phase,),
            compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
            num_cpus=num_cpus, num_gpus=num_gpus or None, resources=dict(resources) or None,
            max_restarts=max_attempts, max_task_retries=max_attempts)


def pool_size() -> int | None:
    """Generator actors alive right now (Ray Data owns them, so ask the GCS actor table; None if the
    private API moved)."""
    try:
        from ray._private import state

        return sum(1 for a in state.actors().values()
                   if a.get("State") == "ALIVE" and ("GenerateStage" in a.get("ActorClassName", "")
                                                     or a.get("ActorClassName", "").endswith("Generator")))
    except Exception:  # progress display only: never fail a run over it
        return None
