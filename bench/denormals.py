"""CPU trainer steps with subnormal floats as the CPU computes them by default vs flushed to zero (FTZ/DAZ).

    .venv/bin/python -m bench --only denormals [--quick]     (SmolLM2-135M-Instruct: make real-model first)

(--quick: 16 questions and 3 epochs of one step each, a check that it runs: too little training to reach
the slow path.)

The samples are the model's own: `bench.sequential` runs jobs/demo-real.yaml's self-play for 2 iterations
and its iteration-1 triplets (y, y' from pi_1, y0 from pi_0) are kept. Each variant is then a fresh process
that loads pi_0 and trains those triplets `epochs` times as a run's iterations do (`Trainer.begin`, a fresh
optimizer, then one epoch of DeepSpeed ZeRO-0 steps), the same steps in both. The candidate is the Trainer
as the trainer actors run it (workers/devices.flush_denormals in its constructor, before the process's first
parallel op: the flag is per thread and OpenMP's threads copy it only when they start); the baseline is the
same Trainer with that call left out, the CPU's default that a loop of plain torch steps has. x86 takes a
slow path for every float operation on a subnormal (below 1.2e-38); no weight and no Adam state is one here,
so they are transient: most likely exp() of the output layer's log-probs as the distribution sharpens.
"""

from __future__ import annotations

import json
import sys

import yaml

from bench.common import Context, Skip, compare

SIZES = {"quick": dict(limit=16, epochs=3), "full": dict(limit=32, epochs=5)}  # from the 3rd on: the slow path
VARIANTS = {"CPU default (subnormals kept)": False, "Trainer (subnormals flushed)": True}


def child(config: str, shards: str, flush: bool, epochs: int, out: str) -> None:
    """One variant, in this fresh process: seconds of each epoch, as JSON at `out`."""
    from pathlib import Path

    import torch

    from bench.common import now
    from bench.sequential import ListShard, setup_for
    from tspin_ray.config.schema import load_config
    from tspin_ray.rollout.shards import read_shards
    from tspin_ray.workers import trainer_rank

    if not flush:  # the CPU's default, as a loop of plain torch steps has it: the only difference
        trainer_rank.flush_denormals = lambda: None

    cfg = load_config(config)
    rows = read_shards(Path(shards)).to_pylist()
    tr = cfg.training
    trainer = trainer_rank.Trainer(0, 1, tr.backend, tr.zero_stage, tr.precision)
    trainer.init_group("127.0.0.1", trainer_rank.free_port())
    trainer.load(str(cfg.model.path))
    seconds, losses = [], []
    for _ in range(epochs):
        trainer.begin(setup_for(cfg, len(rows), 1))
        t0 = now()
        records = trainer.train_epoch(ListShard(rows))
        seconds.append(now() - t0)
        losses.append(records[-1].loss)
    Path(out).write_text(json.dumps({"epoch_seconds": seconds, "losses": losses, "steps": len(records),
                                     "threads": torch.get_num_threads()}))


def run(ctx: Context) -> dict:
    from bench import real_model
    from bench.self_play import real_config, timed_command

    if ctx.gpu:
        raise Skip("a CPU effect: with CUDA the trainer computes on the GPU and flush_denormals does nothing")
    if not real_model.ready():
        raise Skip(real_model.missing_message())
    s = ctx.sizes(SIZES)
    raw = real_config({"limit": s["limit"], "iterations": 2}, real_model.model_dir(), ctx.work / "run")
    config = ctx.work / "sequential.yaml"
    config.write_text(yaml.safe_dump(raw))
    timed_command([sys.executable, "-m", "bench.sequential", "--config", str(config), "--out",
                   str(ctx.work / "sequential.json")], ctx.work / "sequential.log")
    shards = ctx.work / "run" / "gen_1"
    figures = {}
    for label, flush in VARIANTS.items():
        out = ctx.work / f"flush-{flush}.json"
        code = f"from bench.denormals import child; child({str(config)!r}, {str(shards)!r}, {flush}, {s['epochs']}, {str(out)!r})"
        timed_command([sys.executable, "-c", code], ctx.work / f"flush-{flush}.log")
        figures[label] = json.loads(out.read_text())
    (base_label, cand_label) = VARIANTS
    base, cand = figures[base_label], figures[cand_label]
    late = slice(2, None)
    comparisons = [
        compare("seconds per epoch, epochs 3+", "seconds", base_label, sum(base["epoch_seconds"][late]),
                cand_label, sum(cand["epoch_seconds"][late]), higher_is_better=False),
        compare("seconds per epoch, epochs 1-2", "seconds", base_label, sum(base["epoch_seconds"][:2]),
                cand_label, sum(cand["epoch_seconds"][:2]), higher_is_better=False),
    ]
    rows = [[label, " ".join(f"{x:.1f}" for x in f["epoch_seconds"]), " ".join(f"{x:.3g}" for x in f["losses"]),
             f["steps"], f["threads"]] for label, f in figures.items()]
    return {
        "comparisons": comparisons,
        "tables": [{"title": "Each epoch: a fresh optimizer and one pass over the iteration-1 triplets",
                    "columns": ["variant", "epoch seconds", "last loss", "steps an epoch", "threads"],
                    "rows": rows}],
        "notes": [f"SmolLM2-135M-Instruct (Q4_1-rounded weights) as pi_0, fp32, DeepSpeed ZeRO-0, T-SPIN; the "
                  f"{s['limit']} questions' iteration-1 triplets of `bench.sequential` on jobs/demo-real.yaml, "
                  f"{s['epochs']} epochs; each variant a fresh process.",
                  "Both variants take the same steps; the losses show how far flushing moved the numbers."],
        "config": s,
        "details": figures,
    }
