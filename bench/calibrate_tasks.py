"""Calibrate the built-in tasks: held-out exact match of the tiny model SFT'd on 25% and 100% of a pool.

    .venv/bin/python bench/calibrate_tasks.py --tasks addition multiplication --fractions 0.25 1.0

Plain torch in one process (no Ray): a fixed reference for what the tiny model learns from each task in
about a minute on 2 CPU threads. Prints one JSON object per run and a final JSON list.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch

from tspin_ray.algorithms.logprobs import response_lengths, sequence_logprobs
from tspin_ray.config.schema import TinyModelSpec
from tspin_ray.data import tasks as task_lib
from tspin_ray.models.chat_format import chat_format
from tspin_ray.models.tiny import build_tiny_model, build_tokenizer


def greedy_exact_match(model, tokenizer, rows: list[dict], batch_size: int = 200) -> float:
    """Greedy decoding with left padding; fraction of exact matches."""
    model.eval()
    fmt = chat_format(tokenizer)
    max_new = max(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows) + 2
    hits = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            ids = [fmt.prompt_ids(r["prompt"]) for r in chunk]
            width = max(map(len, ids))
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for r, gen in zip(chunk, out[:, width:].tolist(), strict=True):
                hits += task_lib.exact_match(fmt.decode(gen), r["response"])
    model.train()
    return hits / len(rows)


def sft(model, tokenizer, rows: list[dict], epochs: int, lr: float, batch_size: int, warmup_ratio: float,
        seed: int) -> int:
    """AdamW, linear warmup then cosine decay, token-mean NLL on response tokens. Returns steps taken."""
    fmt = chat_format(tokenizer)
    prompts = [fmt.prompt_ids(r["prompt"]) for r in rows]
    responses = [fmt.response_ids(r["prompt"], r["response"]) for r in rows]
    steps_per_epoch = math.ceil(len(rows) / batch_size)
    total = epochs * steps_per_epoch
    warmup = int(warmup_ratio * total)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    rng = random.Random(seed)
    order = list(range(len(rows)))
    model.train()
    for _ in range(epochs):
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            p, r = [prompts[j] for j in idx], [responses[j] for j in idx]
            loss = -sequence_logprobs(model, p, r, tokenizer.pad_token_id).sum() / response_lengths(r).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    return total


# Per-task pool size and SFT epochs, as measured in docs/results.md (the rest of the recipe is shared:
# AdamW, lr 3e-3, batch 64, 5% warmup then cosine).
RECIPES = {"sorting": {"task_size": 4000, "epochs": 30}, "addition": {"task_size": 8000, "epochs": 50},
           "multiplication": {"task_size": 4000, "epochs": 30}}


def run(task: task_lib.Task, fraction: float, args: argparse.Namespace, spec: TinyModelSpec) -> dict:
    recipe = RECIPES.get(task.name, RECIPES["sorting"])
    task_size = args.task_size or recipe["task_size"]
    epochs = args.epochs or recipe["epochs"]
    rows = task.make(task_size, args.data_seed)
    random.Random(args.data_seed).shuffle(rows)
    held_out, pool = rows[: args.eval_size], rows[args.eval_size :]
    train = pool[: max(1, round(fraction * len(pool)))]
    tokenizer = build_tokenizer()
    model = build_tiny_model(spec, tokenizer)
    start = time.perf_counter()
    steps = sft(model, tokenizer, train, epochs, args.lr, args.batch_size, args.warmup_ratio, spec.seed)
    seconds = time.perf_counter() - start
    return {
        "task": task.name, "fraction": fraction, "task_size": task_size, "train_rows": len(train), "epochs": epochs,
        "lr": args.lr, "batch_size": args.batch_size, "steps": steps, "train_seconds": round(seconds, 1),
        "exact_match": greedy_exact_match(model, tokenizer, held_out),
        "train_exact_match": greedy_exact_match(model, tokenizer, train[: args.eval_size]),
        "hidden_size": spec.hidden_size, "num_layers": spec.num_layers, "model_seed": spec.seed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=sorted(task_lib.TASKS))
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.25, 1.0])
    ap.add_argument("--task-size", type=int, default=None, help="default: RECIPES[task]")
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="default: RECIPES[task]")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup-ratio", type=float, default=0.05)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--intermediate-size", type=int, default=256)
    ap.add_argument("--model-seed", type=int, default=0)
    # 1 thread when other work shares the 2 cores: 2 OpenMP threads on a busy machine ran up to 17x slower.
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = TinyModelSpec(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                         intermediate_size=args.intermediate_size, seed=args.model_seed)
    results = []
    for name in args.tasks:
        # Variants for calibration, e.g. "multiplication:4:1" = multiplication(4, 1); plain names use TASKS.
        base, *params = name.split(":")
        task = getattr(task_lib, base)(*map(int, params)) if params else task_lib.get_task(base)
        for fraction in args.fractions:
            result = run(task, fraction, args, spec)
            if params:
                result["task"] = name
            print(json.dumps(result), flush=True)
            results.append(result)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
