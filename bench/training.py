"""Trainer tokens/s: DeepSpeed ZeRO-0, 2 and 3 vs plain torch, one rank, the same T-SPIN batches.

    .venv/bin/python -m bench --only trainer [--quick]
    .venv/bin/python -m bench --only trainer_real [--quick]     (SmolLM2-135M-Instruct: make real-model first)

Every variant runs `Trainer.train_step` (forward over the concatenated y / y' / y0 sequences, T-SPIN loss,
backward, clip, optimizer step) on the same global batches, after the same untimed warm-up steps. The
baseline is plain torch in this process; the candidates run in Ray trainer actors (DeepSpeed needs its
process group, which `TrainerActor.init_group` makes), plain torch among them so the actor itself is
measured too. Actors get as many CPUs as the baseline has torch threads (Ray sets OMP_NUM_THREADS from
num_cpus), so every variant computes with the same intra-op threads. Tokens = prompt + response tokens
of every sequence, unpadded. On a GPU the figures include MFU (6 x parameters x tokens / s over peak).
"""

from __future__ import annotations

import random

from bench.common import (
    GPU_MODEL,
    Context,
    anon_mb,
    compare,
    free_gpu,
    gpu_count,
    make_checkpoint,
    now,
    param_count,
    ray_cpus,
    ray_session,
    skipped,
    sync,
    task_examples,
)
from tspin_ray.workers.records import OptimizerSetup

SIZES = {
    "quick": dict(global_batch=16, micro_batch=8, warmup_steps=1, steps=2, response_chars=(3, 8), model={},
                  precision="fp32", zero_stages=[0, 2, 3]),
    "full": dict(global_batch=64, micro_batch=16, warmup_steps=2, steps=15, response_chars=(3, 8), model={},
                 precision="fp32", zero_stages=[0, 2, 3]),
    "gpu": dict(global_batch=64, micro_batch=16, warmup_steps=3, steps=20, response_chars=(32, 128),
                precision="bf16", zero_stages=[0, 2, 3], model=GPU_MODEL),
}
# The real model (bench/real_model.py's fixture) on the real-model study's arithmetic, fp32 as its runs train.
REAL_SIZES = {
    "quick": dict(global_batch=16, micro_batch=8, warmup_steps=1, steps=2, response_chars=(3, 8), precision="fp32",
                  zero_stages=[0]),
    "full": dict(global_batch=16, micro_batch=8, warmup_steps=1, steps=4, response_chars=(3, 8), precision="fp32",
                 zero_stages=[0]),  # the study's and the demo's trainer; ZeRO-2/3 overheads: --only trainer
    "gpu": dict(global_batch=64, micro_batch=16, warmup_steps=3, steps=20, response_chars=(3, 8), precision="bf16",
                zero_stages=[0, 2, 3]),
}
# Dense bf16 peak FLOP/s by GPU name fragment (vendor data sheets, SXM parts), for MFU.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}
BEGIN = dict(objective="tspin", params={"alpha": 1.0, "beta": 0.1}, optimizer="adamw", lr=1e-5,
             weight_decay=0.0, schedule="constant", warmup_ratio=0.0, grad_clip=1.0)


def shape(model: dict) -> str:
    """What the benchmark's random model is shaped like (bench.common.make_checkpoint's families)."""
    family = model.get("family", "char")
    return "tiny Llama (character tokenizer)" if family == "char" else f"random {family}-shaped model"


def triplet_rows(fmt, n: int, response_chars: tuple[int, int], seed: int = 0, examples=None) -> list[dict]:
    """n T-SPIN rows (prompt, y, one y', one y0) on `addition` prompts (or `examples`); y' and y0 are random
    digit strings of a generator-like length, so every variant trains on exactly the same tokens."""
    rng = random.Random(seed)

    def noise(prompt: str) -> list[int]:
        text = "".join(rng.choice("0123456789") for _ in range(rng.randint(*response_chars)))
        return fmt.response_ids(prompt, text)

    return [{"prompt_ids": fmt.prompt_ids(e["prompt"]), "real_ids": fmt.response_ids(e["prompt"], e["response"]),
             "generated_ids": [noise(e["prompt"])], "proto_ids": [noise(e["prompt"])]}
            for e in (examples or task_examples(n, seed))[:n]]


def step_batches(rows: list[dict], global_batch: int, micro_batch: int) -> list[list[dict]]:
    """Global batches as lists of micro-batches (dicts of lists), the shape Trainer.train_step takes."""
    steps = []
    for s in range(0, len(rows) - global_batch + 1, global_batch):
        chunk = rows[s:s + global_batch]
        steps.append([{k: [r[k] for r in chunk[m:m + micro_batch]] for k in chunk[0]}
                      for m in range(0, global_batch, micro_batch)])
    return steps


def tokens_in(step: list[dict]) -> int:
    """Prompt + response tokens of every sequence of one global batch (y, each y', each y0)."""
    n = 0
    for micro in step:
        for p, y, gs, ps in zip(micro["prompt_ids"], micro["real_ids"], micro["generated_ids"], micro["proto_ids"],
                                strict=True):
            n += len(p) + len(y) + sum(len(p) + len(g) for g in gs) + sum(len(p) + len(g) for g in ps)
    return n


def run_steps(trainer, steps: list[list[dict]]) -> dict:
    """Time each optimizer step; runs wherever `trainer` lives (this process or inside an actor)."""
    seconds, last = [], None
    for micro_batches in steps:
        sync()
        t0 = now()
        last = trainer.train_step(micro_batches)
        sync()
        seconds.append(now() - t0)
    import torch

    return {"step_seconds": seconds, "last_loss": last and last.loss, "threads": torch.get_num_threads()}


def _in_actor(trainer, steps):  # __ray_call__ passes the actor's instance first
    return run_steps(trainer, steps)


def in_process(path: str, s: dict, warmup, timed) -> dict:
    from tspin_ray.workers.trainer_rank import Trainer

    trainer = Trainer(0, 1, "torch", 0, s["precision"])
    trainer.load(path)
    trainer.begin(OptimizerSetup(**BEGIN, total_steps=len(warmup) + len(timed), micro_batch_size=s["micro_batch"],
                                 global_batch_size=s["global_batch"]))
    run_steps(trainer, warmup)
    out = run_steps(trainer, timed)
    del trainer
    free_gpu()
    return out


def in_actor(path: str, s: dict, backend: str, zero: int, cpus: float, warmup, timed) -> dict:
    import ray

    from tspin_ray.workers.trainer_rank import start_trainers

    t0 = now()
    [actor] = start_trainers(1, backend, zero, options={"num_cpus": cpus, "num_gpus": 1 if gpu_count() else None},
                             precision=s["precision"])
    try:
        ray.get(actor.load.remote(path))
        ray.get(actor.begin.remote(OptimizerSetup(**BEGIN, total_steps=len(warmup) + len(timed),
                                                  micro_batch_size=s["micro_batch"], global_batch_size=s["global_batch"])))
        setup_s = now() - t0
        ray.get(actor.__ray_call__.remote(_in_actor, warmup))
        out = ray.get(actor.__ray_call__.remote(_in_actor, timed))
        return {**out, "setup_s": setup_s}
    finally:
        ray.kill(actor)


def summarise(out: dict, tokens: int, params: int) -> dict:
    seconds = sum(out["step_seconds"])
    fig = {"tokens_per_s": tokens / seconds, "step_s": seconds / len(out["step_seconds"]), "seconds": seconds,
           "tokens": tokens, "threads": out["threads"], "last_loss": out["last_loss"],
           "model_flops_per_s": 6 * params * tokens / seconds}
    peak = gpu_peak()
    if peak:
        fig["mfu"] = fig["model_flops_per_s"] / peak
    if "setup_s" in out:
        fig["setup_s"] = out["setup_s"]
    return fig


def gpu_peak() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def run(ctx: Context) -> dict:
    s = ctx.sizes(SIZES)
    return measure(ctx, s, make_checkpoint(ctx.work / "model", **s["model"]), shape(s["model"]))


def run_real(ctx: Context) -> dict:
    """The same variants on SmolLM2-135M-Instruct, on the real-model study's questions (its chat template
    around every prompt: about 40 tokens a sequence)."""
    from bench import real_model
    from bench.common import Skip
    from tspin_ray.data.tasks import TASKS

    if not real_model.ready():
        raise Skip(real_model.missing_message())
    s = ctx.sizes(REAL_SIZES)
    n = (s["warmup_steps"] + s["steps"]) * s["global_batch"]
    return measure(ctx, {**s, "model": {}}, real_model.model_dir(), "SmolLM2-135M-Instruct (Q4_1-rounded weights)",
                   TASKS["arithmetic"].make(n, 1))


def measure(ctx: Context, s: dict, path, what: str, examples=None) -> dict:
    import torch

    from tspin_ray.models.checkpoints import load_format

    params = param_count(path)
    steps = step_batches(triplet_rows(load_format(path), (s["warmup_steps"] + s["steps"]) * s["global_batch"],
                                      tuple(s["response_chars"]), examples=examples), s["global_batch"],
                         s["micro_batch"])
    warmup, timed = steps[:s["warmup_steps"]], steps[s["warmup_steps"]:]
    tokens = sum(tokens_in(st) for st in timed)
    threads = min(torch.get_num_threads(), ray_cpus())  # an actor asking for more CPUs than Ray has never starts
    figures = {"torch, in-process": summarise(in_process(str(path), s, warmup, timed), tokens, params)}
    with ray_session() as ray_start_s:
        variants = [("torch, Ray actor", "torch", 0)] + [
            (f"DeepSpeed ZeRO-{z}, Ray actor", "deepspeed", z) for z in s["zero_stages"]]
        for label, backend, zero in variants:
            try:
                figures[label] = summarise(in_actor(str(path), s, backend, zero, threads, warmup, timed),
                                           tokens, params)
            except Exception as e:  # one failing variant (e.g. a DeepSpeed op build) must not hide the rest
                figures[label] = {"skipped": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    base = figures["torch, in-process"]
    comparisons = []
    for label, fig in figures.items():
        if label == "torch, in-process":
            continue
        if "skipped" in fig:
            comparisons.append({"name": label, "metric": "train tokens/s", "baseline": "torch, in-process",
                                "baseline_value": base["tokens_per_s"], "candidate": label, "skipped": fig["skipped"]})
        else:
            comparisons.append(compare(label, "train tokens/s", "torch, in-process", base["tokens_per_s"], label,
                                       fig["tokens_per_s"]))
    rows = [[label, f.get("tokens_per_s"), f.get("step_s"), f.get("threads"), f.get("setup_s"),
             f.get("mfu", "n/a" if not ctx.gpu else None), f.get("last_loss")]
            for label, f in figures.items() if "skipped" not in f]
    notes = [
        f"{params / 1e6:.2f}M-parameter {what}, {s['precision']}; T-SPIN, global batch {s['global_batch']} "
        f"(micro {s['micro_batch']}, so {s['global_batch'] // s['micro_batch']} accumulation steps), "
        f"{len(timed)} timed steps after {len(warmup)} warm-up steps; {tokens / len(timed):.0f} tokens per step "
        f"(3 sequences per example).",
        f"Every variant uses {threads} torch threads (actors get num_cpus={threads}). Actor setup (process start, "
        f"process group, load, DeepSpeed initialize) is the setup s column, not in tokens/s; Ray started in "
        f"{ray_start_s:.1f} s.",
        "MFU needs a GPU peak: n/a on CPU (model FLOP/s = 6 x parameters x tokens/s is in the JSON)."
        if not ctx.gpu else "MFU = 6 x parameters x tokens/s / dense bf16 peak of the GPU (attention FLOPs left out).",
    ]
    return {"comparisons": comparisons, "config": s, "notes": notes, "details": figures,
            "headline": "DeepSpeed ZeRO-0, Ray actor",  # the default training backend
            "tables": [{"title": "Per variant", "columns": ["variant", "tokens/s", "step s", "threads", "setup s",
                                                            "MFU", "last loss"], "rows": rows}]}


# ------------------------------------------------------------ trainer memory at load (ZeRO-3 zero.Init)
MEMORY_SIZES = {
    "quick": dict(ranks=2, model={}),
    "full": dict(ranks=2, model=dict(hidden_size=768, num_layers=8, num_heads=12, intermediate_size=2048,
                                     max_position_embeddings=512)),
    "gpu": dict(ranks=1, model=dict(family="qwen2", hidden_size=2048, num_layers=16, num_heads=16,
                                    intermediate_size=5632, max_position_embeddings=1024)),
}
# The job configs' memory arithmetic (jobs/zephyr-7b-*.yaml) for AdamW in bf16, per parameter, over the ranks.
# Held between steps: bf16 weights 2 + bf16 grads 2 + fp32 master 4 + Adam m, v 8 = 16 B (DeepSpeed creates
# the Adam states at the first step, not at initialize, and keeps gradients in the model's dtype); the job
# configs' 20 B adds fp32 grads 4, which exist only inside the optimizer step: read it against the step's peak.
HELD_BYTES, STEP_BYTES = 16, 20


def _memory_mb(trainer) -> dict:  # __ray_call__: runs inside the actor on its Trainer
    import resource

    import torch

    out = {"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "anon_mb": anon_mb()}
    if torch.cuda.is_available():
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_alloc_mb"] = torch.cuda.memory_allocated() / 2**20
    if trainer.model is not None:
        out.update(trainer.param_counts())
    return out


def _export_peak(trainer, out_dir: str, shard_bytes: int) -> dict:  # __ray_call__, on every rank at once
    """Trainer.export with RssAnon sampled every 2 ms: the most host memory the export adds on this rank."""
    import threading

    import torch

    start, peak, done = anon_mb(), [0.0], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], anon_mb())

    thread = threading.Thread(target=sample, daemon=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    gpu_start = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    thread.start()
    seconds = trainer.export(out_dir, shard_bytes).seconds
    done.set()
    thread.join()
    out = {"rank": trainer.rank, "host_mb": max(peak[0], anon_mb()) - start, "seconds": seconds}
    if torch.cuda.is_available():
        out["gpu_mb"] = (torch.cuda.max_memory_allocated() - gpu_start) / 2**20
    return out


def _reset_peak(trainer) -> None:  # __ray_call__
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def one_step(actors, path: str) -> list[dict]:
    """One optimizer step of one short T-SPIN row per rank, then each rank's memory (peak since the step began)."""
    import ray

    from tspin_ray.models.checkpoints import load_format

    rows = triplet_rows(load_format(path), len(actors), (3, 8))
    ray.get([a.__ray_call__.remote(_reset_peak) for a in actors])
    ray.get([a.train_step.remote(step_batches([row], 1, 1)[0]) for a, row in zip(actors, rows, strict=True)])
    return ray.get([a.__ray_call__.remote(_memory_mb) for a in actors])


def load_memory(path: str, ranks: int, zero: int, export_shard: int | None = None, out_dir=None,
                precision: str = "fp32", step: bool = False) -> dict:
    """Peak memory each of `ranks` DeepSpeed trainer actors adds while loading `path` (before any step)."""
    import ray

    from tspin_ray.workers.trainer_rank import start_trainers

    actors = start_trainers(ranks, "deepspeed", zero, options={"num_cpus": 1 if ray_cpus() >= ranks else 0.5,
                                                                "num_gpus": 1 if gpu_count() else None},
                            precision=precision)
    try:
        before = ray.get([a.__ray_call__.remote(_memory_mb) for a in actors])
        t0 = now()
        ray.get([a.load.remote(path) for a in actors])
        load_s = now() - t0
        loaded = ray.get([a.__ray_call__.remote(_memory_mb) for a in actors])
        ray.get([a.begin.remote(OptimizerSetup(**BEGIN, total_steps=1, micro_batch_size=1, global_batch_size=ranks))
                 for a in actors])
        ready = ray.get([a.__ray_call__.remote(_memory_mb) for a in actors])
        stepped = one_step(actors, path) if step else None
        if export_shard:  # rank 0's figures: the rank that writes
            export = ray.get([a.__ray_call__.remote(_export_peak, str(out_dir), export_shard) for a in actors])[0]
    finally:
        for a in actors:
            ray.kill(a)

    def added(key, after):
        return max(a[key] - b[key] for a, b in zip(after, before, strict=True))

    fig = {"load_s": load_s, "held_params": max(a["held"] for a in loaded), "full_params": loaded[0]["full"],
           "host_mb_load": added("maxrss_mb", loaded), "host_mb": added("maxrss_mb", ready),
           "anon_mb_load": added("anon_mb", loaded), "anon_mb": added("anon_mb", ready)}
    if "gpu_peak_mb" in before[0]:
        fig.update(gpu_mb_load=added("gpu_peak_mb", loaded), gpu_mb=added("gpu_peak_mb", ready))
        if stepped:
            fig.update(gpu_held_step_mb=added("gpu_alloc_mb", stepped), gpu_peak_step_mb=added("gpu_peak_mb", stepped))
    if export_shard:
        fig["export"] = export
    return fig


def arithmetic_comparisons(z3: dict, params: int, ranks: int) -> list[dict]:
    """ZeRO-3's GPU memory per rank around one step against the job configs' per-parameter arithmetic."""
    out = []
    for key, bytes_, what in (("gpu_held_step_mb", HELD_BYTES, "held after one step (memory_allocated)"),
                              ("gpu_peak_step_mb", STEP_BYTES, "peak during one step (max_memory_allocated)")):
        name, metric = f"ZeRO-3 {what.split(' (')[0]} vs arithmetic", f"GPU MB per rank {what}"
        arithmetic = params * bytes_ / ranks / 2**20
        baseline = f"job-config arithmetic ({bytes_} B/param / {ranks} rank(s), AdamW bf16)"
        if key in z3:
            out.append(compare(name, metric, baseline, arithmetic, "measured", z3[key], higher_is_better=False))
        else:
            out.append(skipped(name, metric, baseline, arithmetic, "measured", "GPU only: on CPU the states are "
                               "host memory, mixed with the allocator's and the page cache's"))
    return out


def run_memory(ctx: Context) -> dict:
    s = ctx.sizes(MEMORY_SIZES)
    if ctx.gpu and gpu_count() < s["ranks"]:
        s = {**s, "ranks": gpu_count()}
    path = make_checkpoint(ctx.work / "model", **s["model"])
    params, ranks = param_count(path), s["ranks"]
    precision = "bf16" if ctx.gpu else "fp32"
    model_bytes = params * (2 if ctx.gpu else 4)
    with ray_session():  # each export in fresh actors: a process's RssAnon does not shrink back after one
        figures = {"ZeRO-2": load_memory(str(path), ranks, 2, precision=precision),
                   "ZeRO-3": load_memory(str(path), ranks, 3, 2 * model_bytes, ctx.work / "whole", precision,
                                         step=True)}
        sharded = load_memory(str(path), ranks, 3, model_bytes // 8, ctx.work / "sharded", precision)["export"]
    base, z3 = figures["ZeRO-2"], figures["ZeRO-3"]
    whole = z3["export"]
    metric, where = ("gpu_mb", "GPU") if "gpu_mb" in z3 else ("host_mb", "host")
    comparisons = [
        compare("parameters held", "parameters per rank after load", "ZeRO-2 (whole model per rank)",
                base["held_params"], "ZeRO-3 (zero.Init)", z3["held_params"], higher_is_better=False),
        compare("peak memory", f"{where} MB added per rank by load + initialize (peak)", "ZeRO-2", base[metric],
                "ZeRO-3", z3[metric], higher_is_better=False),
        compare("anonymous memory", "host MB the process holds after initialize (RssAnon)", "ZeRO-2",
                base["anon_mb"], "ZeRO-3", z3["anon_mb"], higher_is_better=False),
        *arithmetic_comparisons(z3, params, ranks),
        compare("export, rank 0 host", "host MB rank 0 adds while exporting the ZeRO-3 model (peak RssAnon)",
                "one file", whole["host_mb"], "1/8-model shards", sharded["host_mb"], higher_is_better=False,
                seconds=[whole["seconds"], sharded["seconds"]]),
    ]
    rows = [[label, f["held_params"], f["host_mb_load"], f["host_mb"], f["anon_mb"], f.get("gpu_mb_load", "n/a"),
             f.get("gpu_mb", "n/a"), f["load_s"]] for label, f in figures.items()]
    notes = [f"{params / 1e6:.1f}M-parameter {shape(s['model'])} ({precision}: {model_bytes / 2**20:.0f} MiB), {ranks} DeepSpeed "
             f"trainer actor(s). Memory added by `Trainer.load` and then by DeepSpeed's initialize in "
             f"`Trainer.begin`: peak resident (ru_maxrss, which counts the checkpoint's page-cache pages a rank "
             f"reads), anonymous memory held after initialize (RssAnon), CUDA max allocated on a GPU; each minus "
             f"its value before the load (imports and the process group are already in it).",
             f"ZeRO-2 loads the whole model on every rank and partitions only at DeepSpeed's initialize; ZeRO-3 "
             f"builds it inside deepspeed.zero.Init, so each rank holds 1/{ranks} of the parameters from the "
             f"start (ideal ratio {1 / ranks:.2f}). Host memory is the GPU figure's stand-in only on a GPU-less "
             f"machine: there ZeRO-3's own buffers and transformers' zero3 load path (rank 0 reads the whole "
             f"state dict) are not amortised by a small model, so read the parameter count, not the MB, here.",
             f"Against the job configs' arithmetic (GPU only): memory held after one optimizer step vs "
             f"{HELD_BYTES} B/param, and the step's peak vs their {STEP_BYTES} B/param. Held includes DeepSpeed's "
             f"gradient bucket (reduce_bucket_size, 5e8 elements by default: ~0.93 GiB in bf16), a fixed cost the "
             f"per-parameter arithmetic leaves out; the peak includes the step's activations.",
             f"Export: ZeRO-3 `Trainer.export` gathers and writes one safetensors shard at a time; rank 0's host "
             f"memory then grows by about one shard, not the model ({model_bytes / 2**20:.0f} MiB): one file "
             f"{whole['host_mb']:.0f} MB in {whole['seconds']:.2f} s vs 1/8-model shards {sharded['host_mb']:.0f} MB "
             f"in {sharded['seconds']:.2f} s (RssAnon sampled every 2 ms on rank 0)."]
    return {"comparisons": comparisons, "config": s, "notes": notes,
            "details": {**figures, "ZeRO-3 export in 1/8-model shards": sharded}, "headline": "parameters held",
            "tables": [{"title": "Per ZeRO stage (MB added per rank, peak)",
                        "columns": ["stage", "parameters held after load", "host MB, load", "host MB, + initialize",
                                    "anon MB after initialize", "GPU MB, load", "GPU MB, + initialize", "load s"],
                        "rows": rows}]}
