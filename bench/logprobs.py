"""Log-probs without the full-vocabulary tensor: activation memory and tokens/s of one T-SPIN step at a 128k
and a 152k vocabulary, the full-logits path (baseline) vs the chunked target log-probs
(tspin_ray/algorithms/logprobs.py), and the chunked backward's weight gradient before and after it
accumulated in place (before: a [V, H] product and an fp32 copy of it per chunk in bf16).

    .venv/bin/python -m bench --only logprob_memory [--quick]

Each variant runs in a fresh process (`python -m bench.logprobs VARIANT SIZE VOCAB`): a random Llama-3-sized
vocabulary (128,256) on a small trunk, one warm-up step (AdamW's states exist before anything is read),
then timed steps of the trainer's computation: `step_losses`: log-probs of y / y' / y0 -> T-SPIN loss -> backward
-> AdamW step. Memory is what the step adds on top of the memory held before it: on a GPU the CUDA
allocator's peak; on CPU the process's anonymous memory sampled every 2 ms, with glibc told to map large
blocks (MALLOC_MMAP_THRESHOLD_) so freed activations leave the process between steps. Activation memory is
that minus the parameter gradients, which both variants make in every backward.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading

from bench.common import Context, anon_mb, compare, now, sync

SIZES = {
    "quick": dict(hidden=128, layers=1, rows=2, prompt=24, response=48, steps=2, dtype="bfloat16"),  # 2 chunks
    "full": dict(hidden=256, layers=2, rows=4, prompt=64, response=64, steps=3, dtype="bfloat16"),
    "gpu": dict(hidden=1024, layers=4, rows=8, prompt=256, response=256, steps=5, dtype="bfloat16"),
}
VOCABS = {"Llama-3": 128256, "Qwen2": 152064}
VARIANTS = ("full logits", "chunked, product per chunk", "chunked")


def product_per_chunk(grad_weight, dlogits, h):
    """How the chunked backward added a chunk's weight gradient before (bf16): a whole [V, H] product, then
    an fp32 copy of it."""
    import torch

    if dlogits.dtype == torch.float32:
        grad_weight.addmm_(dlogits.T, h)
    else:
        grad_weight += (dlogits.T @ h).float()


def measure(variant: str, s: dict) -> dict:
    """In this (fresh) process: one warm-up and s["steps"] timed steps; peak MB added over the held memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tspin_ray.algorithms import logprobs
    from tspin_ray.algorithms.inputs import step_losses
    from tspin_ray.algorithms.objectives import OBJECTIVES

    if variant == "full logits":
        logprobs._scored_head = lambda model: None  # the path every model took before the chunked one
    elif variant == "chunked, product per chunk":
        logprobs.accumulate = product_per_chunk
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["hidden"] // 64, num_key_value_heads=s["hidden"] // 64,
                      intermediate_size=4 * s["hidden"], max_position_embeddings=2 * (s["prompt"] + s["response"]))
    model = LlamaForCausalLM(cfg).to(device=device, dtype=getattr(torch, s["dtype"])).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(3, s["vocab"]) for _ in range(n)]

    batch = {"prompt_ids": [ids(s["prompt"]) for _ in range(s["rows"])],
             "real_ids": [ids(s["response"]) for _ in range(s["rows"])],
             "generated_ids": [[ids(s["response"])] for _ in range(s["rows"])],
             "proto_ids": [[ids(s["response"])] for _ in range(s["rows"])]}
    tokens = 3 * s["rows"] * (s["prompt"] + s["response"])

    def step():
        losses, _ = step_losses(model, batch, OBJECTIVES["tspin"], {"alpha": 1.0, "beta": 0.1}, pad_id=0)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(losses.mean())

    step()  # warm-up: optimizer states, allocator pools
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    peak, done = [anon_mb()], threading.Event()
    start = peak[0]

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], anon_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = now()
    losses = [step() for _ in range(s["steps"])]
    sync()
    seconds = now() - t0
    done.set()
    thread.join()
    grads_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20  # made in every backward
    out = {"tokens_per_s": tokens * s["steps"] / seconds, "step_s": seconds / s["steps"], "last_loss": losses[-1],
           "grads_mb": grads_mb, "host_peak_added_mb": max(peak[0], anon_mb()) - start,
           "weights_l1": sum(float(p.double().abs().sum()) for p in model.parameters())}  # after the steps
    if device == "cuda":
        out["gpu_peak_added_mb"] = (torch.cuda.max_memory_allocated() - held) / 2**20
    out["activation_mb"] = out.get("gpu_peak_added_mb", out["host_peak_added_mb"]) - grads_mb
    return out


def run(ctx: Context) -> dict:
    size = "quick" if ctx.quick else "gpu" if ctx.gpu else "full"
    s, figures, comparisons, rows = SIZES[size], {}, [], []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for family, vocab in VOCABS.items():
        for variant in VARIANTS:
            proc = subprocess.run([sys.executable, "-m", "bench.logprobs", variant, size, str(vocab)],
                                  capture_output=True, text=True, env=env, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"{variant}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
            figures[f"{variant} @ {vocab}"] = f = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append([f"{variant}, {family} {vocab:,}", f["activation_mb"], f.get("gpu_peak_added_mb",
                         f["host_peak_added_mb"]), f["tokens_per_s"], f["step_s"], f["last_loss"], f["weights_l1"]])
        base, before, new = (figures[f"{v} @ {vocab}"] for v in VARIANTS)
        mem = "gpu_peak_added_mb" if "gpu_peak_added_mb" in base else "host_peak_added_mb"
        where = "GPU (CUDA peak)" if mem.startswith("gpu") else "host (RssAnon peak)"
        comparisons += [
            compare(f"activation memory, {vocab:,}", f"MB one step adds beyond its parameter gradients, {where}",
                    "full logits", base["activation_mb"], "chunked", new["activation_mb"], higher_is_better=False),
            compare(f"step memory, {vocab:,}", f"MB one step adds, gradients included, {where}", "full logits",
                    base[mem], "chunked", new[mem], higher_is_better=False),
            compare(f"in-place weight gradient, {vocab:,}", f"MB one step adds, {where}", "product per chunk",
                    before[mem], "in place", new[mem], higher_is_better=False),
            compare(f"speed, {vocab:,}", "train tokens/s", "full logits", base["tokens_per_s"], "chunked",
                    new["tokens_per_s"]),
        ]
        # the in-place sum changes no number: the same weights after the steps, to 1e-5 relative
        if abs(before["weights_l1"] - new["weights_l1"]) > 1e-5 * abs(before["weights_l1"]):
            raise RuntimeError(f"vocabulary {vocab}: weights differ after the steps ({before['weights_l1']!r} vs "
                               f"{new['weights_l1']!r})")
    logits_mb = {v: 3 * s["rows"] * (s["prompt"] + s["response"]) * v * 4 / 2**20 for v in VOCABS.values()}
    notes = [f"Random Llama, vocabularies {' and '.join(f'{v:,}' for v in VOCABS.values())}, hidden {s['hidden']}, "
             f"{s['layers']} layer(s), {s['dtype']}; one T-SPIN micro-batch of {s['rows']} rows = {3 * s['rows']} "
             f"sequences of {s['prompt']} prompt + {s['response']} response tokens; one fp32 [sequences, positions, "
             f"vocab] tensor is {' / '.join(f'{m:.0f}' for m in logits_mb.values())} MiB. Each variant in its own "
             f"process; one run each.",
             "Baseline = the full-logits path (logits of every position, fp32 log-softmax, gather), which every "
             "model took before; candidate = response positions only, 128 MiB fp32 chunks, logits recomputed in "
             "backward. 'product per chunk' = the chunked backward as it was before its weight gradient "
             "accumulated in place (a [V, H] product and an fp32 copy per chunk); weights_l1 (the sum of |w| "
             "after the steps) is the same for both to 1e-5, checked here."]
    return {"comparisons": comparisons, "config": {**s, "vocabs": VOCABS}, "notes": notes, "details": figures,
            "headline": "in-place weight gradient, 152,064",
            "tables": [{"title": "Per variant", "columns": ["variant", "activation MB", "MB added", "tokens/s", "step s",
                                                            "last loss", "weights l1"], "rows": rows}]}


if __name__ == "__main__":  # a variant in this fresh process: python -m bench.logprobs VARIANT SIZE VOCAB
    print(json.dumps(measure(sys.argv[1], {**SIZES[sys.argv[2]], "vocab": int(sys.argv[3])})))
