"""The reference loop and the self_play baseline: a run config's self-play iterations in one process, the uclaml/SPIN way.

    .venv/bin/python -m bench.sequential --config run.yaml --out seq.json

For t = 0 .. iterations-1: one engine generates y' for every prompt, batch after batch (the same encoding,
per-sample seeds and engine as GenerateStage, so the samples equal a tspin-ray run's); then the Trainer,
in this process, trains the run's epochs on the triplets (epoch 0 in input order, then shuffled with the
run's seeds, as Driver.epoch_data does); pi_{t+1} is saved as a checkpoint and loaded into the engine.
T-SPIN's y0 are iteration 0's samples, as in the Driver. Nothing is evaluated and nothing streams: it is
the work a tspin-ray run with `data.eval_size: 0` does, with no Ray, actors or Ray Data around it.
bench/self_play.py times it against `tspin-ray train` on the same config.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace


class ListShard:
    """What Trainer.train_epoch uses of a Ray Data DataIterator (iter_batches), over rows in memory."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def iter_batches(self, batch_size: int, batch_format: str = "numpy", drop_last: bool = False,
                     prefetch_batches: int = 1):  # rows already in memory: nothing to fetch ahead
        for i in range(0, len(self.rows), batch_size):
            chunk = self.rows[i:i + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            yield {k: [r[k] for r in chunk] for k in chunk[0]}


def generate_batch(engine, fmt, chunk: list[dict], kw) -> dict[str, list]:
    """GenerateStage.__call__ without Ray and without reference scoring: the same encoding, seeds, engine
    call, decoding and Parquet shard. (GenerateStage itself asks ray.get_runtime_context() for its name,
    which starts a whole local Ray when it runs outside one.)"""
    import pyarrow as pa

    from tspin_ray.models.chat_format import response_budget
    from tspin_ray.rollout.seeds import sample_seed
    from tspin_ray.rollout.shards import write_shard

    k, ids = kw.samples, [r["prompt_id"] for r in chunk]
    pairs = [fmt.example_ids(r["prompt"], r["response"], r["system"], kw.max_response_tokens, kw.max_length,
                             r["history"])
             for r in chunk]
    prompt_ids, real_ids = [p for p, _ in pairs], [y for _, y in pairs]
    budget = [response_budget(len(p), kw.max_response_tokens, kw.max_length) for p in prompt_ids]
    outs = engine.generate([p for p in prompt_ids for _ in range(k)],
                           [sample_seed(kw.seed, kw.iteration, i, s) for i in ids for s in range(k)],
                           max_new_tokens=kw.max_new_tokens, temperature=kw.temperature, top_p=kw.top_p)
    generated = [[fmt.cut(outs[i * k + s])[:budget[i]] or [fmt.end_of_turn] for s in range(k)]
                 for i in range(len(chunk))]
    out = {"prompt_id": ids, "source_iteration": [r["source_iteration"] for r in chunk], "prompt_ids": prompt_ids,
           "real_ids": real_ids, "generated_ids": generated,
           "generated": [[fmt.decode(g) for g in gs] for gs in generated],
           "proto_ids": [r["proto_ids"] for r in chunk],
           "gen_tokens": [sum(len(g) for g in gs) for gs in generated]}
    if kw.out_dir:
        write_shard(pa.Table.from_pydict(out), Path(kw.out_dir), [f"{r['source_iteration']}:{r['prompt_id']}"
                                                                      for r in chunk])
    return out


def setup_for(cfg, n_rows: int, t: int = 0):
    """What Driver.begin_training gives the trainers for iteration t over n_rows rows (Driver.plan's steps)."""
    from tspin_ray.controller.trainer_group import optimizer_setup, steps_per_epoch

    return optimizer_setup(cfg, t, steps_per_epoch(n_rows, cfg.resources.trainers, cfg.training.global_batch_size))


def generate_all(engine, fmt, rows: list[dict], kw, batch_size: int) -> list[dict]:
    """Every row's samples, one engine call per batch, as rows (the Parquet shards are written too)."""
    out = []
    for i in range(0, len(rows), batch_size):
        got = generate_batch(engine, fmt, rows[i:i + batch_size], kw)
        out += [dict(zip(got, values, strict=True)) for values in zip(*got.values(), strict=True)]
    return out


def run(cfg, out_dir: Path) -> dict:
    """cfg.iterations iterations from cfg.model.path; per-phase seconds of each, and where pi_N went."""
    import torch

    from tspin_ray.controller.prepare import prepare
    from tspin_ray.rollout.phases import phase_for, prompt_rows, shuffled
    from tspin_ray.rollout.seeds import derive_seed
    from tspin_ray.workers.devices import flush_denormals
    from tspin_ray.workers.engines import make_engine
    from tspin_ray.workers.trainer_rank import Trainer, free_port

    flush_denormals()  # as the trainer actor does, and before the engine starts this process's OpenMP threads
    t_start = time.time()
    prep = prepare(cfg)
    obj = cfg.objective
    if (cfg.needs_sft_stage or obj.name != "tspin" or obj.entry.reference(obj.loss_params)
            or cfg.resources.trainers != 1):
        raise SystemExit("bench.sequential runs T-SPIN without a reference (no dpop_lambda) from model.path, with "
                         "one trainer and no SFT stage")
    g, tr = cfg.generation, cfg.training
    pi = Path(cfg.model.path).resolve()
    kw0 = phase_for(cfg, pi, 0, samples=cfg.samples_per_prompt, temperature=g.temperature,
                    max_new_tokens=g.max_new_tokens, score_ref=False)
    engine = make_engine(g.backend, str(pi), seed=cfg.seed, **kw0.engine.kwargs())
    trainer = Trainer(0, 1, tr.backend, tr.zero_stage, tr.precision)
    trainer.init_group("127.0.0.1", free_port())
    trainer.load(str(pi))
    setup_s = time.time() - t_start
    y0, iterations = None, []
    for t in range(cfg.iterations):
        t0 = time.time()
        rows = prompt_rows(prep.train, t, y0).to_pylist()
        kw = SimpleNamespace(**{**vars(kw0), "iteration": t, "out_dir": str(out_dir / f"gen_{t}")})
        triplets = generate_all(engine, prep.format, rows, kw, g.batch_size)
        gen_s = time.time() - t0
        if t == 0 and cfg.objective.name == "tspin":  # iteration 0's y' serve as y0 (controller/y0.py)
            y0 = {r["prompt_id"]: r["generated_ids"] for r in triplets}
        t1 = time.time()
        trainer.begin(setup_for(cfg, len(triplets), t))
        records, step_s = [], []
        for epoch in range(tr.epochs):
            order = triplets if epoch == 0 else shuffled(triplets, derive_seed(cfg.seed, "train", t, epoch))
            got = trainer.train_epoch(ListShard(order))
            records += got
            step_s.append(sum(r.step_s for r in got))
        train_s = time.time() - t1
        t2 = time.time()
        pi = out_dir / "checkpoints" / f"pi_{t + 1}"
        trainer.export(str(pi))
        trainer.loaded_from = str(pi)  # it holds pi_{t+1} already
        engine.reload(str(pi))
        iterations.append({"iteration": t, "seconds": time.time() - t0, "generate_s": gen_s, "train_s": train_s,
                           "export_and_load_s": time.time() - t2, "steps": len(records),
                           "step_s_per_epoch": step_s, "tokens": sum(int(r["gen_tokens"]) for r in triplets),
                           "final_loss": records[-1].loss if records else None})
    return {"setup_s": setup_s, "run_s": time.time() - t_start, "iterations": iterations,
            "checkpoint": str(pi), "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    from tspin_ray.config.schema import load_config

    p = argparse.ArgumentParser(prog="python -m bench.sequential", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a run config with model.path and no SFT stage")
    p.add_argument("--out", required=True, help="where the JSON result goes")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    result = run(cfg, Path(cfg.output_dir))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
