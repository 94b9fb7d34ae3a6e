"""Padding: one T-SPIN step on rows of mixed lengths, a padded row per sequence (baseline) vs sequences
packed into shared rows (tspin_ray/algorithms/logprobs.py `pack_batch`).

    .venv/bin/python -m bench --only padding [--quick]

The rows look like self-play data: a long annotated y beside shorter samples y' and y0, prompts of
varied length. Both variants run the trainer's computation in this process on the same micro-batches
(`step_losses`: log-probs of y / y' / y0 -> T-SPIN loss -> backward -> AdamW step), alternating step by step
so that machine noise hits both alike; a warm-up step each first. Padding fraction = positions holding
no token / all positions of the forward. Tokens = prompt + response tokens of every sequence, unpadded.
"""

from __future__ import annotations

import random
import statistics

from bench.common import Context, compare, now, sync

SIZES = {
    "quick": dict(hidden=64, layers=1, vocab=4096, rows=8, prompt=(8, 32), real=(16, 64), sample=(4, 24), steps=2,
                  dtype="float32"),
    "full": dict(hidden=256, layers=4, vocab=32000, rows=16, prompt=(16, 64), real=(32, 192), sample=(8, 64),
                 steps=6, dtype="float32"),
    "gpu": dict(hidden=1024, layers=8, vocab=32000, rows=16, prompt=(64, 512), real=(128, 1024), sample=(32, 256),
                steps=10, dtype="bfloat16"),
}
VARIANTS = ("padded", "packed")


def mixed_batch(s: dict, seed: int = 0) -> dict:
    rng = random.Random(seed)

    def ids(span):
        return [rng.randrange(3, s["vocab"]) for _ in range(rng.randint(*span))]

    return {"prompt_ids": [ids(s["prompt"]) for _ in range(s["rows"])],
            "real_ids": [ids(s["real"]) for _ in range(s["rows"])],
            "generated_ids": [[ids(s["sample"])] for _ in range(s["rows"])],
            "proto_ids": [[ids(s["sample"])] for _ in range(s["rows"])]}


def sequences(batch: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) of every sequence one T-SPIN forward scores: y, then y', then y0."""
    out = []
    for key in ("real_ids", "generated_ids", "proto_ids"):
        for p, r in zip(batch["prompt_ids"], batch[key], strict=True):
            out.append((p, r if key == "real_ids" else r[0]))
    return out


def positions(batch: dict, packed: bool) -> tuple[int, int]:
    """(tokens, positions) of the forward: unpadded tokens, and the ids tensor's size either way."""
    from tspin_ray.algorithms.logprobs import pack_batch, pad_batch

    prompts, responses = zip(*sequences(batch), strict=True)
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    ids = (pack_batch if packed else pad_batch)(prompts, responses, 0)[0]
    return tokens, ids.numel()


def run(ctx: Context) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tspin_ray.algorithms import logprobs
    from tspin_ray.algorithms.inputs import step_losses
    from tspin_ray.algorithms.objectives import OBJECTIVES

    s = SIZES["quick" if ctx.quick else "gpu" if ctx.gpu else "full"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    width = s["prompt"][1] + s["real"][1]
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["hidden"] // 32, num_key_value_heads=s["hidden"] // 32,
                      intermediate_size=4 * s["hidden"], max_position_embeddings=width)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=getattr(torch, s["dtype"])).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = [mixed_batch(s, seed) for seed in range(s["steps"] + 1)]
    packs = logprobs.packs

    def step(batch, variant):
        logprobs.packs = packs if variant == "packed" else (lambda model, width: False)
        try:
            sync()
            t0 = now()
            losses, _ = step_losses(model, batch, OBJECTIVES["tspin"], {"alpha": 1.0, "beta": 0.1}, pad_id=0)
            losses.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            return now() - t0
        finally:
            logprobs.packs = packs

    for variant in VARIANTS:  # warm-up: optimizer states, allocator pools, kernels
        step(batches[0], variant)
    seconds = {v: [] for v in VARIANTS}
    for batch in batches[1:]:
        for variant in VARIANTS:
            seconds[variant].append(step(batch, variant))
    figures = {}
    for variant in VARIANTS:
        counts = [positions(b, variant == "packed") for b in batches[1:]]
        tokens, slots = sum(c[0] for c in counts), sum(c[1] for c in counts)
        figures[variant] = {"tokens_per_s": tokens / sum(seconds[variant]), "padding_fraction": 1 - tokens / slots,
                            "median_step_s": statistics.median(seconds[variant]), "tokens": tokens, "positions": slots}
    base, new = figures["padded"], figures["packed"]
    comparisons = [
        compare("padding", "fraction of forward positions holding no token", "padded", base["padding_fraction"],
                "packed", new["padding_fraction"], higher_is_better=False),
        compare("speed", "train tokens/s", "padded", base["tokens_per_s"], "packed", new["tokens_per_s"]),
    ]
    notes = [f"Random Llama, hidden {s['hidden']}, {s['layers']} layer(s), vocabulary {s['vocab']:,}, {s['dtype']}, "
             f"sdpa attention; {s['steps']} timed T-SPIN micro-batches of {s['rows']} rows (3 sequences each), "
             f"prompt {s['prompt']}, y {s['real']}, y' and y0 {s['sample']} tokens (uniform). Variants alternate "
             f"step by step in one process, same model and optimizer.",
             "Baseline = one right-padded row per sequence (every model before packing); candidate = first-fit "
             "packing into rows as wide as the longest sequence, block-causal 4D mask; equal log-probs and "
             "gradients to 1e-5 in fp32 (tests/unit/algorithms/test_logprobs.py)."]
    rows = [[v, f["padding_fraction"], f["tokens_per_s"], f["median_step_s"], f["positions"]] for v, f in figures.items()]
    return {"comparisons": comparisons, "config": s, "notes": notes, "details": figures, "headline": "speed",
            "tables": [{"title": "Per variant", "columns": ["variant", "padding fraction", "tokens/s",
                                                            "median step s", "positions"], "rows": rows}]}
