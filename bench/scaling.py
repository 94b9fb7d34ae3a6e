"""Generation scaling: throughput of the Ray Data generator pool with 1, 2 and 4 actors.

    .venv/bin/python -m bench --only scaling [--quick]

`generation_dataset` with min = max = k actors (HF backend, 1 CPU each, a random tiny model, the same
prompts and seeds for every k) consumed with `take_all()`; tokens/s = tokens generated / wall time from
dataset creation to the last row, actor start included (what a generation phase costs). One more row runs
a single actor with 2 CPUs, i.e. 2 torch intra-op threads instead of 2 actors: threads vs processes.
"""

from __future__ import annotations

import os
import time

from bench.common import (
    Context,
    actor_threads,
    compare,
    gpu_count,
    make_checkpoint,
    now,
    ray_session,
    task_examples,
)

SIZES = {
    "quick": dict(actors=[1, 2, 4], prompts=96, batch=16, max_new_tokens=8, threads_row=False, warmup=False, model={}),
    "full": dict(actors=[1, 2, 4], prompts=1536, batch=64, max_new_tokens=32, threads_row=True, warmup=True, model={}),
    "gpu": dict(actors=[1, 2, 4], prompts=4096, batch=256, max_new_tokens=64, threads_row=False, warmup=True,
                model=dict(hidden_size=1024, num_layers=16, num_heads=16, intermediate_size=2816,
                           max_position_embeddings=1024)),
}


def rows_for(n: int):
    from tspin_ray.data.loading import Example
    from tspin_ray.rollout.phases import prompt_rows

    return prompt_rows([Example(e["id"], e["prompt"], e["response"]) for e in task_examples(n)], 0)


def gen_phase(path, s: dict):
    from tspin_ray.rollout.phases import GenPhase

    return GenPhase(model_path=str(path), iteration=0, seed=0, samples=1, max_new_tokens=s["max_new_tokens"],
                    temperature=1.0, top_p=1.0, max_response_tokens=64, max_length=256)


def pool_throughput(rows, kwargs, batch: int, actors: int, cpus: float) -> dict:
    """Wall-clock tokens/s (actor start included) and steady tokens/s (once every actor has delivered)."""
    from tspin_ray.workers.generation_stage import generation_dataset

    gpus = gpu_count()
    t0, t0_wall = now(), time.time()  # gen_done stamps are time.time()
    out = generation_dataset(rows, kwargs, batch_size=batch, min_actors=actors, max_actors=actors,
                             num_cpus=cpus, num_gpus=min(1.0, gpus / actors) if gpus else 0, resources={},
                             max_attempts=2).take_all()
    wall = now() - t0
    tokens = sum(int(r["gen_tokens"]) for r in out)
    # Rows of one batch share their gen_done stamp, and rows of one actor its `generator` name (older
    # tspin_ray: its engine_load_s, a measured duration, distinct per actor). The steady window opens when the last actor delivers its first batch:
    # from then on every actor's process start, imports and engine load are behind it.
    batches: dict[float, int] = {}
    first_of_actor: dict[float, float] = {}
    for r in out:
        done_at, actor = float(r["gen_done"]), r.get("generator", float(r["engine_load_s"]))
        batches[done_at] = batches.get(done_at, 0) + int(r["gen_tokens"])
        first_of_actor[actor] = min(done_at, first_of_actor.get(actor, done_at))
    start, last = max(first_of_actor.values()), max(batches)
    later = sum(n for t, n in batches.items() if t > start)
    steady = later / (last - start) if later and last > start else None
    return {"tokens_per_s": tokens / wall, "steady_tokens_per_s": steady, "tokens": tokens, "seconds": wall,
            "first_batch_s": min(batches) - t0_wall, "batches": len(batches), "actors_used": len(first_of_actor),
            "engine_load_s": max(float(r["engine_load_s"]) for r in out)}


def run(ctx: Context) -> dict:
    s = ctx.sizes(SIZES)
    path = make_checkpoint(ctx.work / "model", **s["model"])
    rows, kwargs = rows_for(s["prompts"]), gen_phase(path, s)
    figures = {}
    with ray_session() as ray_start_s:
        threads = {1: actor_threads(1), 2: actor_threads(2)}
        if s["warmup"]:  # the first execution also pays Ray Data's start and a cold page cache
            pool_throughput(rows[:s["batch"]], kwargs, s["batch"], 1, 1)
        for k in s["actors"]:
            figures[f"{k} actor{'s' * (k > 1)} x 1 CPU"] = pool_throughput(rows, kwargs, s["batch"], k, 1)
        if s["threads_row"]:
            figures["1 actor x 2 CPUs"] = pool_throughput(rows, kwargs, s["batch"], 1, 2)
    base_name = next(iter(figures))
    base = figures[base_name]
    comparisons = []
    if base["steady_tokens_per_s"]:
        comparisons += [compare(name, "tokens/s (steady, all actors started)", base_name,
                                base["steady_tokens_per_s"], name, f["steady_tokens_per_s"])
                        for name, f in figures.items() if name != base_name and f["steady_tokens_per_s"]]
    comparisons += [compare(name, "tokens/s (wall, actor start included)", base_name, base["tokens_per_s"], name,
                            f["tokens_per_s"]) for name, f in figures.items() if name != base_name]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    table = [[name, f["tokens_per_s"], f["tokens_per_s"] / base["tokens_per_s"], f["steady_tokens_per_s"],
              f["seconds"], f["first_batch_s"], f["tokens"], f["actors_used"], f["engine_load_s"]]
             for name, f in figures.items()]
    return {
        "comparisons": comparisons, "config": s, "details": {"figures": figures, "actor_threads": threads,
                                                             "ray_start_s": ray_start_s, "cores": cores},
        "tables": [{"title": "Generator pool", "columns": ["pool", "tokens/s (wall)", "speed-up", "steady tokens/s",
                                                           "wall s", "first batch s", "tokens", "actors used",
                                                           "engine load s"],
                    "rows": table}],
        "notes": [
            f"{s['prompts']} `addition` prompts in batches of {s['batch']}, max_new_tokens {s['max_new_tokens']}, "
            f"random tiny model, HF backend. Wall tokens/s include starting the actors (process, imports, engine: "
            f"most of the first batch s); steady tokens/s count the batches that finish after the last actor's "
            f"first one (every actor started by then), over the time from then to the last batch. Ray Data "
            f"hands each actor several batches at once, so with few batches the split is uneven (actors used).",
            f"This machine has {cores} usable cores and Ray runs with 8 logical CPUs. A 1-CPU actor runs torch "
            f"with {threads[1]} intra-op thread(s) (Ray sets OMP_NUM_THREADS = num_cpus; a 2-CPU actor gets "
            f"{threads[2]}), so 1 actor uses one core: 2 actors can use both; beyond {cores} actors there is "
            "nothing left to gain here, only more processes to start and schedule.",
            "On a GPU machine k actors share the GPU (1/k each): throughput is then bound by the GPU, not by "
            "actor count.",
        ],
    }
