"""LoRA vs full weights: bytes and seconds of one weight sync, and the trainer's peak memory for one step.

    .venv/bin/python -m bench --only lora [--quick]

Sync is what a new iterate costs a long-lived generator with `generation.weight_sync: checkpoint`: the
trainer writes it (full: `save_pretrained`; LoRA: `weight_export.export_adapter`, the adapter alone) and the running
engine takes it up to its first generated token (full: `reload` of the weights; LoRA: a new adapter id,
the base untouched). Memory: one T-SPIN `Trainer.train_step` (AdamW, fp32) in a fresh process per variant,
peak anonymous memory over the process's memory after `load` (weights in), sampled every 2 ms: the step's
activations, gradients and optimizer states, which LoRA cuts to the adapter's.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading

from bench.common import Context, anon_mb, compare, make_checkpoint, median, now, skipped
from bench.training import BEGIN, step_batches, triplet_rows
from tspin_ray.workers.records import OptimizerSetup

SIZES = {
    "quick": dict(model=dict(family="llama3", hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256),
                  r=8, repeats=2, rows=8, global_batch=8, micro_batch=8),
    "full": dict(model=dict(family="llama3", hidden_size=768, num_layers=8, num_heads=12, intermediate_size=2048,
                            max_position_embeddings=512), r=16, repeats=3, rows=8, global_batch=8, micro_batch=8),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def spec(r: int):
    from tspin_ray.config.schema import LoraSpec

    return LoraSpec(r=r, alpha=2.0 * r, target_modules=TARGETS)


def _trainer(path: str, r: int | None):
    from tspin_ray.workers.trainer_rank import Trainer

    trainer = Trainer(0, 1, "torch")
    trainer.load(path, lora=spec(r) if r else None)
    return trainer


def state_mb(trainer) -> float:
    """MB of what training keeps between steps beyond the frozen weights: trainable weights, their
    gradients and the optimizer's states (exact, from the tensors themselves)."""
    import torch

    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    nbytes = sum(p.nbytes + (p.grad.nbytes if p.grad is not None else 0) for p in trained)
    nbytes += sum(v.nbytes for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    return nbytes / 1e6


def step_memory(path: str, r: int | None, s: dict) -> dict:
    """In a fresh process: one training step's peak memory above the loaded model (r None: full), and
    the training state it leaves (state_mb). Peak: CUDA's allocator peak on a GPU; on the CPU the
    process's anonymous memory sampled every 2 ms (the weights are mapped from the file until written)."""
    import torch

    from tspin_ray.models.checkpoints import load_format

    torch.set_num_threads(1)
    trainer = _trainer(path, r)
    steps = step_batches(triplet_rows(load_format(path), s["rows"], (8, 24)), s["global_batch"], s["micro_batch"])
    trainer.begin(OptimizerSetup(**BEGIN, total_steps=len(steps), micro_batch_size=s["micro_batch"],
                                 global_batch_size=s["global_batch"]))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 1e6 if cuda else anon_mb()
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_mb())
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for micro_batches in steps:
        trainer.train_step(micro_batches)
    done.set()
    sampler.join()
    top = torch.cuda.max_memory_allocated() / 1e6 if cuda else max(peak[0], anon_mb())
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"peak_over_loaded_mb": top - base, "state_mb": state_mb(trainer), "trainable_params": trained,
            "params": sum(p.numel() for p in trainer.model.parameters()), "peak_source": "cuda" if cuda else "rss"}


def in_fresh_process(fn, *args):
    ctx = multiprocessing.get_context("spawn")  # a fresh heap: no freed memory of the other variant reused
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def sync_times(path, work, s: dict, backend: str) -> dict:
    """Export + engine pickup of a changed iterate, full weights vs adapter, each to its first token; each
    variant on an engine of its own (the full one without LoRA enabled, as a run without LoRA has it)."""
    import torch

    from bench.common import free_gpu
    from bench.weights import first_token
    from tspin_ray.models.checkpoints import load_model
    from tspin_ray.models.lora import size_bytes
    from tspin_ray.workers.engines import make_engine
    from tspin_ray.workers.weight_export import export_adapter

    out = {"full": {"export_s": [], "reload_s": []}, "lora": {"export_s": [], "reload_s": []}}
    trainer = _trainer(str(path), s["r"])
    full = load_model(path)
    for variant, model, rank in (("lora", trainer.model, s["r"]), ("full", full, None)):
        engine = make_engine(backend, str(path), lora_rank=rank, max_model_len=256, seed=0)
        first_token(engine)
        for i in range(s["repeats"]):
            with torch.no_grad():  # a new iterate each time (B = 0 would also make the adapter the base)
                for name, p in model.named_parameters():
                    if variant == "full" or "lora_B" in name:
                        p.add_(torch.randn_like(p) * 0.01)
            target = work / f"{variant}-{i}"
            t0 = now()
            if variant == "lora":
                export_adapter(model, 0, str(target))
            else:  # what Trainer.export writes without LoRA
                model.save_pretrained(target, safe_serialization=True)
            trainer.tokenizer.save_pretrained(target)
            out[variant]["export_s"].append(now() - t0)
            t0 = now()
            engine.reload(str(target))
            first_token(engine)
            out[variant]["reload_s"].append(now() - t0)
            out[variant]["bytes"] = size_bytes(target)
        del engine
        free_gpu()
    return out


def run(ctx: Context) -> dict:
    import importlib.util

    s = ctx.sizes(SIZES)
    path = make_checkpoint(ctx.work / "base", **s["model"])
    backend = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    comparisons, details = [], {}
    try:
        syncs = sync_times(path, ctx.work, s, backend)
    except Exception as e:  # report it, still measure memory
        syncs = None
        comparisons.append(skipped("sync", "seconds", "full weights", None, "adapter", f"{type(e).__name__}: {e}"[:200]))
    if syncs:
        full, lora = syncs["full"], syncs["lora"]
        details["sync"] = syncs
        comparisons += [
            compare("sync: bytes written and read", "MB", "full weights", full["bytes"] / 1e6, "adapter",
                    lora["bytes"] / 1e6, higher_is_better=False),
            compare("sync: export", "seconds", "full weights", median(full["export_s"]), "adapter",
                    median(lora["export_s"]), higher_is_better=False),
            compare(f"sync: {backend} engine pickup to first token", "seconds", "reload full weights",
                    median(full["reload_s"]), "new adapter id", median(lora["reload_s"]), higher_is_better=False),
        ]
    memory = {name: in_fresh_process(step_memory, str(path), r, s) for name, r in (("full", None), ("lora", s["r"]))}
    details["memory"] = memory
    comparisons += [
        compare("trainer: training state (trainable weights + grads + AdamW states)", "MB", "full weights",
                memory["full"]["state_mb"], f"LoRA r={s['r']}", memory["lora"]["state_mb"], higher_is_better=False,
                trainable_params={k: v["trainable_params"] for k, v in memory.items()}),
        compare(f"trainer step: peak memory over the loaded model ({memory['full']['peak_source']})", "MB",
                "full weights", memory["full"]["peak_over_loaded_mb"], f"LoRA r={s['r']}",
                memory["lora"]["peak_over_loaded_mb"], higher_is_better=False),
    ]
    params = memory["full"]["params"]
    notes = [
        f"Model: random Llama-3-shaped, {params / 1e6:.1f}M parameters, fp32; LoRA r={s['r']}, alpha={2 * s['r']} "
        f"on {', '.join(TARGETS)} ({memory['lora']['trainable_params'] / 1e6:.2f}M trainable). Engine: {backend}.",
        "Sync seconds: the trainer's write of the iterate plus the running engine's pickup to its first token "
        f"(medians of {s['repeats']}). Memory: one T-SPIN step of {s['global_batch']} rows (AdamW), a fresh "
        "process per variant. Training state is exact (tensor sizes). The peak is CUDA's allocator peak on a "
        "GPU; on the CPU it is RssAnon sampled every 2 ms above the process after load, where activations "
        "and the allocator's reuse of freed memory make it noisy (runs differ by hundreds of MB).",
    ]
    return {"comparisons": comparisons, "details": details, "notes": notes}
