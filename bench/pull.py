"""Long-lived generators with one slow engine: how batches reach the engines.

    .venv/bin/python -m bench --only generator_pull [--quick]

Two long-lived Generator actors (`GeneratorPool`, vLLM-CPU engines; HF with --quick) serve the same
prompts with the same per-sample seeds; actor 1's engine is slowed (each engine step, or HF generate
call, sleeps `slow - 1` times what it took, like a busier or smaller device). Three ways, over warmed
engines, each run `repeats` times, alternating:
- round robin: batch b to actor b mod 2 (what the pool did first, rebuilt here over the same actors);
- pulled: each batch to whichever actor is idle, one batch per engine call (`slots=1`);
- pulled, shared steps (vLLM only): two batches run at once on each actor and their requests share the
  engine's steps, so the next batch fills the tail of the one before (`slots=2`, what
  `generation.engine_batches: 2` sets; engines.VLLMEngine._run).
Phase wall = dataset creation to the last row; tokens/s over that wall.
"""

from __future__ import annotations

import statistics
import time
import warnings

from bench.common import Context, compare, make_checkpoint, now, ray_session
from bench.scaling import gen_phase, rows_for

SHARED = "pulled, 2 batches per engine sharing its steps"
SIZES = {
    "quick": dict(backend="hf", prompts=64, batch=8, max_new_tokens=8, slow=3.0, repeats=1),
    "full": dict(backend="vllm", prompts=768, batch=64, max_new_tokens=32, slow=3.0, repeats=2),
}


def _slow_down(generator, factor: float) -> str:  # runs in the actor (__ray_call__ passes it first)
    engine = generator.stage.engine
    target, name = (engine.llm.llm_engine, "step") if hasattr(engine, "llm") else (engine, "generate")
    real = getattr(target, name)

    def slowed(*args, **kwargs):
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        time.sleep((factor - 1) * (time.perf_counter() - t0))
        return out

    setattr(target, name, slowed)
    return generator.stage.name


def round_robin(pool, rows, phase, batch: int):
    """The pool's dataset as it was: batch b to actor b mod n, whatever the actors' speeds."""
    import pyarrow as pa
    import ray

    from tspin_ray.rollout.phases import blocks

    actors, timeout = pool.actors, pool.cfg.generation.timeout_s

    def forward(b: dict) -> dict:
        actor = actors[int(b["slot"][0]) % len(actors)]
        return ray.get(actor.run.remote({k: v for k, v in b.items() if k != "slot"}, phase), timeout=timeout)

    parts = [p.append_column("slot", pa.array([i] * p.num_rows, pa.int64())) for i, p in enumerate(blocks(rows, batch))]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ray.data.from_arrow(parts).map_batches(
            forward, batch_size=None, batch_format="numpy", num_cpus=0.01,
            compute=ray.data.TaskPoolStrategy(size=min(len(parts), 2 * len(actors))))


def measure(ds) -> dict:
    t0 = now()
    out = ds.take_all()
    wall = now() - t0
    by_actor: dict[str, int] = {}
    for r in out:
        by_actor[r["generator"]] = by_actor.get(r["generator"], 0) + 1
    tokens = sum(int(r["gen_tokens"]) for r in out)
    return {"seconds": wall, "tokens_per_s": tokens / wall, "rows": len(out), "rows_by_actor": by_actor}


def run(ctx: Context) -> dict:
    from tspin_ray.config.schema import from_dict
    from tspin_ray.workers.generator_pool import GeneratorPool

    s = ctx.sizes(SIZES)
    path = make_checkpoint(ctx.work / "model")
    rows = rows_for(s["prompts"])
    cfg = from_dict({"model": {"tiny": {}}, "data": {"task": "addition"}, "output_dir": str(ctx.work / "run"),
                     "generation": {"backend": s["backend"], "persistent": True, "batch_size": s["batch"]},
                     "resources": {"generators_min": 2, "generators_max": 2, "generator_cpus": 1}})
    phase = gen_phase(path, s)
    if s["backend"] == "vllm":
        from dataclasses import replace

        phase = replace(phase, engine=replace(phase.engine, backend="vllm", max_model_len=256))  # the tiny model's max_position_embeddings
    import ray

    runs: dict[str, list] = {}
    slowed: set[str] = set()  # the slowed engines' names (rows record which engine made them)
    with ray_session():
        pools = {"round robin": GeneratorPool(cfg, slots=1)}
        pools["pulled by idle engines"] = pools["round robin"]  # the same actors, the pool's own dataset
        if s["backend"] == "vllm":
            pools[SHARED] = GeneratorPool(cfg, slots=2)
        distinct = list({id(p): p for p in pools.values()}.values())
        try:
            for pool in distinct:
                measure(pool.dataset(rows.slice(0, 2 * s["batch"]), phase, s["batch"], 2))  # both engines load
                slowed.add(ray.get(pool.actors[1].__ray_call__.remote(_slow_down, s["slow"])))
            for _ in range(s["repeats"]):
                for name, pool in pools.items():
                    ds = round_robin(pool, rows, phase, s["batch"]) if name == "round robin" else \
                        pool.dataset(rows, phase, s["batch"], 2)
                    runs.setdefault(name, []).append(measure(ds))
        finally:
            for pool in distinct:
                pool.shutdown()
    figures = {}
    for name, rs in runs.items():
        figures[name] = {"seconds": statistics.median(r["seconds"] for r in rs),
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                         "slow_actor_rows": statistics.median(sum(n for a, n in r["rows_by_actor"].items()
                                                                  if a in slowed) for r in rs),
                         "runs": rs}
    base, new = figures["round robin"], figures["pulled by idle engines"]
    comparisons = [
        compare("phase wall", "seconds, one slowed engine of 2", "round robin", base["seconds"], "pulled by idle engines",
                new["seconds"], higher_is_better=False),
        compare("throughput", "tokens/s, one slowed engine of 2", "round robin", base["tokens_per_s"],
                "pulled by idle engines", new["tokens_per_s"]),
    ]
    if SHARED in figures:
        shared = figures[SHARED]
        comparisons += [
            compare("phase wall, batches sharing steps", "seconds, one slowed engine of 2", "pulled, one batch per call",
                    new["seconds"], SHARED, shared["seconds"], higher_is_better=False),
            compare("throughput, batches sharing steps", "tokens/s, one slowed engine of 2",
                    "pulled, one batch per call", new["tokens_per_s"], SHARED, shared["tokens_per_s"]),
        ]
    notes = [f"{s['prompts']} `addition` prompts in batches of {s['batch']}, max_new_tokens {s['max_new_tokens']}, "
             f"random tiny model, {s['backend']} engines, 2 long-lived actors x 1 CPU; actor 1 {s['slow']:g}x slower "
             f"(sleeps after each engine step; HF: after each generate call); medians of {s['repeats']} run(s) per variant, alternating.",
             "Which actor runs a batch changes no sample (per-sample seeds) and no row count (every phase ends in "
             "check_complete; tests/e2e/test_family_runs.py runs long-lived pools)."]
    table = [[n, f["seconds"], f["tokens_per_s"], f["slow_actor_rows"], s["prompts"]] for n, f in figures.items()]
    return {"comparisons": comparisons, "config": s, "notes": notes, "details": figures, "headline": "phase wall",
            "tables": [{"title": "Per variant", "columns": ["assignment", "phase s", "tokens/s",
                                                            "rows on the slow actor", "rows"], "rows": table}]}
