"""Resume of an iteration whose generation is 90% on disk: seconds from start to the first new batch.

    .venv/bin/python -m bench --only resume

A synthetic run directory: `prompts` unique addition prompts, 90% of iteration 0's rows already written
as `shards` Parquet shards by pi_0 (the rows hold what GenerateStage writes, with short responses). The
candidate is today's `Driver.plan` (shards read once, stale shards checked by their origin columns)
followed by the generation of the first missing batch on a tiny HF model. The baseline is the same with
the planning of tspin-ray up to c5b1cc5 (fixed by one line in 040cf17; this benchmark measures that fix),
whose list-comprehension condition re-read every shard once per row: `[r for r in rows if key(r) not in done_keys(read_shards(gen_dir))]`. At 50k rows
that is 50k x 200 shard reads, hours, so it is timed on `sample` rows and scaled to all of them (the
time per row is flat: each row reads the same 200 files).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import Context, compare, make_checkpoint, now, ray_session

SIZES = {
    "quick": dict(prompts=5000, shards=40, sample=5, batch=64),
    "full": dict(prompts=50_000, shards=200, sample=10, batch=64),
}


def write_run(work: Path, s: dict):
    """Data file, config and tiny pi_0 of the synthetic run."""
    from tspin_ray.config.schema import from_dict

    data = work / "data.jsonl"
    rows = [{"prompt_id": f"p{i}", "prompt": f"{i // 1000}+{i % 1000}=", "response": str(i // 1000 + i % 1000)}
            for i in range(s["prompts"])]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pi0 = make_checkpoint(work / "pi_0", hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    cfg = from_dict({
        "model": {"path": str(pi0)}, "data": {"path": str(data), "eval_size": 0},
        "generation": {"backend": "hf", "max_new_tokens": 4, "batch_size": s["batch"]},
        "training": {"backend": "torch", "global_batch_size": 64, "micro_batch_size": 64, "max_length": 48},
        "objective": {"name": "spin"}, "iterations": 1, "output_dir": str(work / "run")})
    return cfg, pi0


def fill_shards(driver, s: dict) -> int:
    """90% of iteration 0's rows, in `shards` shards, as pi_0 and this engine would have written them."""
    import pyarrow as pa

    from tspin_ray.rollout.shards import write_shard

    gen = driver.run.generations(0)
    checkpoint = driver.run.checkpoint_id(0)
    done = int(len(driver.prep.train) * 0.9)
    per = -(-done // s["shards"])
    for start in range(0, done, per):
        part = driver.prep.train[start:min(start + per, done)]
        n = len(part)
        write_shard(pa.table({
            "prompt_id": [e.prompt_id for e in part], "source_iteration": [0] * n,
            "prompt_ids": [[1, 2, 3]] * n, "real_ids": [[4, 5]] * n, "generated_ids": [[[6, 7]]] * n,
            "generated": [["xy"]] * n, "proto_ids": [[]] * n, "ref_real": [-1.0] * n,
            "ref_generated": [[-2.0]] * n, "gen_tokens": [2] * n, "gen_done": [0.0] * n,
            "engine_load_s": [0.0] * n, "generator": ["bench"] * n, "checkpoint": [checkpoint] * n,
            "scorer": ["hf:float32"] * n}), gen, [f"0:{e.prompt_id}" for e in part])
    return done


def first_batch_s(driver, todo, phase) -> float:
    """Seconds until the first missing batch comes out of the generation stream."""
    t0 = now()
    next(iter(driver.generate(todo, phase).iter_batches(batch_size=None, batch_format="numpy")))
    return now() - t0


def run(ctx: Context) -> dict:
    from tspin_ray.controller.driver import Driver
    from tspin_ray.controller.prepare import prepare
    from tspin_ray.rollout.shards import done_keys, read_shards

    s = ctx.sizes(SIZES)
    cfg, pi0 = write_run(ctx.work, s)
    with ray_session():
        driver = Driver(prepare(cfg), quiet=True)
        try:
            driver.run.commit("pi_0", path=str(pi0), files={}, external=True)
            done = fill_shards(driver, s)
            # Candidate: plan (reads the shards once) + the first new batch.
            t0 = now()
            plan = driver.plan(0, pi0, None)
            plan_s = now() - t0
            first_s = first_batch_s(driver, plan.todo, plan.phase)
            assert plan.todo.num_rows == len(driver.prep.train) - done
            # Baseline: the per-row shard re-read, on `sample` rows, scaled to every row.
            rows = plan.rows.to_pylist()
            gen_dir = driver.run.generations(0)
            t0 = now()
            old = [r for r in rows[:s["sample"]]
                   if (r["source_iteration"], r["prompt_id"]) not in done_keys(read_shards(gen_dir))]
            per_row = (now() - t0) / s["sample"]
            assert old == []  # the sampled rows are among the 90% on disk
            old_plan_s = per_row * len(rows)
        finally:
            driver.close()
    before, after = old_plan_s + first_s, plan_s + first_s
    return {
        "comparisons": [compare("resume", "seconds from start to the first new generation batch",
                                "per-row shard re-read (extrapolated)", before, "shards read once", after,
                                higher_is_better=False)],
        "config": s,
        "details": {"rows": len(rows), "on_disk": done, "plan_s": plan_s, "first_batch_s": first_s,
                    "old_seconds_per_row": per_row, "old_plan_s": old_plan_s},
        "notes": [f"{len(rows)} rows, {done} of them on disk in {s['shards']} shards; the old planning re-read "
                  f"all shards for each row: {per_row * 1e3:.1f} ms per row (timed on {s['sample']} rows), "
                  f"{old_plan_s / 3600:.2f} h for all of them; today's plan {plan_s:.2f} s, then the first "
                  f"new batch in {first_s:.1f} s (engine start included)."],
    }
