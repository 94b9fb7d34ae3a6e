"""The real pipeline: one self-play iteration (wall time, breakdown, overlap) and its Ray overhead.

    .venv/bin/python -m bench --only iteration ray_overhead [--quick]

`iteration`: `Driver.run_all` on a config like the tests' SMALL but bigger (default tiny model, 1 iteration,
1 epoch, so the whole train phase is the streamed one), timings read back from metrics.jsonl. Then, with
the same Driver, generation alone (`generation_dataset(...).take_all()`, same pi_0, prompts and seeds) and
training alone (`TrainerGroup.train_stream` over the persisted triplet rows): overlap = the iteration's
train phase / (generation alone + training alone); below 1 means streaming hid work.

`ray_overhead`: the same generation + training work (same prompts, sizes, trainer settings; pi_t is the
random tiny model, y0 a fixed wrong answer) once as a single-process loop without Ray (the engine
generating batch after batch as GenerateStage does, then `Trainer` in-process) and once as the Ray pipeline
(`generation_dataset` streamed into a `TrainerGroup`, as `Driver.iteration` does).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from bench.common import Context, actor_threads, compare, gpu_count, make_checkpoint, now, ray_session
from bench.sequential import ListShard, generate_batch, setup_for

SIZES = {
    "quick": dict(task_size=240, eval_size=40, max_new_tokens=8, gen_batch=16, global_batch=32, micro_batch=16,
                  sft_epochs=1, sft_batch=32, model={}),
    "full": dict(task_size=1200, eval_size=100, max_new_tokens=16, gen_batch=32, global_batch=64, micro_batch=16,
                 sft_epochs=2, sft_batch=64, model={}),
}
TIMINGS = ("timing/generate", "timing/train", "timing/checkpoint", "timing/weight_sync", "timing/eval")


def run_config(s: dict, out_dir) -> dict:
    """SMALL (tests/conftest.py) scaled up: the default tiny model, one iteration of one epoch, 1+1 actors."""
    gpus = gpu_count()
    share = 0.0 if not gpus else (0.5 if gpus == 1 else 1.0)  # one GPU: generator and trainer split it
    return {
        "model": {"tiny": s["model"]},
        "data": {"task": "addition", "task_size": s["task_size"], "eval_size": s["eval_size"]},
        "generation": {"backend": "hf", "max_new_tokens": s["max_new_tokens"], "batch_size": s["gen_batch"]},
        "training": {"backend": "torch", "optimizer": "adamw", "lr": 1.0e-4, "epochs": 1,
                     "global_batch_size": s["global_batch"], "micro_batch_size": s["micro_batch"], "max_length": 64},
        "sft": {"epochs": s["sft_epochs"], "lr": 3.0e-3, "global_batch_size": s["sft_batch"],
                "micro_batch_size": s["sft_batch"]},
        "objective": {"name": "tspin"},
        "resources": {"trainers": 1, "trainer_cpus": 1, "trainer_gpus": share, "generators_min": 1,
                      "generators_max": 1, "generator_cpus": 1, "generator_gpus": share},
        "eval": {"max_new_tokens": 8},
        "iterations": 1,
        "output_dir": str(out_dir),
        "seed": 0,
    }


def gen_phase(cfg, model_path, out_dir):
    """The GenPhase exactly as the Driver builds it for iteration 0 (Driver.plan)."""
    from tspin_ray.rollout.phases import phase_for

    g = cfg.generation
    return phase_for(cfg, model_path, 0, samples=cfg.samples_per_prompt, temperature=g.temperature,
                     max_new_tokens=g.max_new_tokens, score_ref=False, out_dir=out_dir)


def generation(cfg, rows, phase):
    """The lazy generation dataset exactly as Driver.generate builds it."""
    from tspin_ray.controller.driver import Driver

    return Driver.generate(SimpleNamespace(cfg=cfg), rows, phase)


# ------------------------------------------------------------ iteration
def iteration_row(run_dir) -> dict:
    from tspin_ray.rundir.metrics import read_rows

    rows = [r for r in read_rows(run_dir / "metrics.jsonl") if r.get("phase") == "iteration" and r.get("iteration") == 0]
    if not rows:
        raise RuntimeError(f"no iteration-0 row in {run_dir / 'metrics.jsonl'}")
    return rows[-1]


def apart(driver, work) -> dict:
    """Generation alone and training alone, on the iteration's own inputs (pi_0, prompts, seeds, y0)."""
    import ray

    from tspin_ray.rollout.phases import in_row_order, prompt_rows
    from tspin_ray.rollout.shards import read_shards

    cfg = driver.cfg
    pi0 = driver.run.checkpoint(0)
    rows = prompt_rows(driver.prep.train, 0, driver.proto_cache(pi0))  # y0: read back from the run's cache
    gen_dir = work / "generation-alone"
    t0 = now()
    out = generation(cfg, rows, gen_phase(cfg, pi0, gen_dir)).take_all()
    gen_s = now() - t0
    table = in_row_order(read_shards(gen_dir), rows)
    group = driver.trainer_group(pi0)  # back to pi_0 (the group holds pi_1 after the iteration)
    group.begin(setup_for(cfg, rows.num_rows))
    t0 = now()
    records = group.train_stream(ray.data.from_arrow(table))
    train_s = now() - t0
    return {"generation_s": gen_s, "generation_tokens": sum(int(r["gen_tokens"]) for r in out),
            "training_s": train_s, "training_steps": len(records), "rows": rows.num_rows}


def run_iteration(ctx: Context) -> dict:
    from tspin_ray.config.schema import from_dict
    from tspin_ray.controller.driver import Driver
    from tspin_ray.controller.prepare import prepare

    s = ctx.sizes(SIZES)
    cfg = from_dict(run_config(s, ctx.work / "run"))
    with ray_session() as ray_start_s:
        driver = Driver(prepare(cfg), quiet=True)
        try:
            t0 = now()
            driver.run_all()
            run_s = now() - t0
            it = iteration_row(driver.run.root)
            alone = apart(driver, ctx.work)
        finally:
            driver.close()
    wall, phase = it["timing/iteration"], it["timing/train"]
    sequential = alone["generation_s"] + alone["training_s"]
    ideal = max(alone["generation_s"], alone["training_s"])
    comparisons = [compare("overlap", "seconds", "generation alone + training alone", sequential,
                           "streamed train phase (timing/train)", phase, higher_is_better=False)]
    comparisons += [compare(key, "seconds", "iteration wall (timing/iteration)", wall, key, it[key],
                            higher_is_better=None) for key in TIMINGS if key in it]
    return {
        "comparisons": comparisons, "config": {**s, "run_config": run_config(s, "<tmp>")},
        "details": {"iteration_metrics": {k: v for k, v in it.items() if k.startswith(("timing/", "generate/"))},
                    "apart": alone, "run_all_s": run_s, "ray_start_s": ray_start_s},
        "tables": [{"title": "Measured apart vs streamed", "columns": ["what", "seconds", "note"], "rows": [
            ["generation alone", alone["generation_s"], f"{alone['generation_tokens']} tokens, "
             f"{alone['generation_tokens'] / alone['generation_s']:.0f} tokens/s incl. actor start"],
            ["training alone", alone["training_s"], f"{alone['training_steps']} steps over {alone['rows']} rows"],
            ["sum (no overlap)", sequential, ""],
            ["perfect overlap", ideal, f"ratio {ideal / sequential:.2f} is the best streaming can do"],
            ["streamed train phase", phase, f"first train step after {it.get('timing/first_train_step', 0):.1f} s"],
            ["whole iteration", wall, "train phase + export + eval of pi_1"],
        ]}],
        "notes": [
            f"{alone['rows']} training rows (addition, task_size {s['task_size']}), T-SPIN, 1 epoch, generation batch "
            f"{s['gen_batch']}, max_new_tokens {s['max_new_tokens']}, 1 generator actor (1 CPU) and 1 torch trainer "
            f"(1 CPU), both 1 torch thread.",
            "The breakdown rows are shares of the iteration wall; they overlap (generation runs inside the train "
            "phase, weight_sync is the generator's engine start inside generation), so they do not add up.",
            f"Whole run (SFT of pi_0, its evaluation, the y0 cache, the iteration): {run_s:.1f} s; "
            f"Ray started in {ray_start_s:.1f} s.",
        ],
    }


# ------------------------------------------------------------ Ray overhead
def overhead_inputs(ctx: Context, s: dict):
    """Config, pi_t, and the iteration's rows with a fixed y0 per prompt (no generation needed for it)."""
    from tspin_ray.config.schema import from_dict
    from tspin_ray.controller.prepare import prepare
    from tspin_ray.models.checkpoints import load_format
    from tspin_ray.rollout.phases import prompt_rows

    cfg = from_dict(run_config(s, ctx.work / "unused"))
    prep = prepare(cfg)
    path = make_checkpoint(ctx.work / "pi", **s["model"])
    fmt = load_format(path)
    k = cfg.samples_per_prompt
    proto = {e.prompt_id: [fmt.response_ids(e.prompt, e.response[::-1])] * k for e in prep.train}
    return cfg, path, prompt_rows(prep.train, 0, proto)


def single_process(cfg, path, rows, out_dir) -> dict:
    """The same work with no Ray: one engine generating batch after batch, then Trainer in-process."""
    import torch

    from tspin_ray.models.checkpoints import load_format
    from tspin_ray.workers.engines import make_engine
    from tspin_ray.workers.trainer_rank import Trainer

    tr, batch = cfg.training, cfg.generation.batch_size
    kw = gen_phase(cfg, path, out_dir)
    t0 = now()
    engine = make_engine(kw.engine.backend, kw.model_path, seed=kw.seed, **kw.engine.kwargs())
    fmt = load_format(path)
    loaded = now()
    generated, first = [], None
    plain = rows.to_pylist()
    for i in range(0, len(plain), batch):
        out = generate_batch(engine, fmt, plain[i:i + batch], kw)
        generated += [dict(zip(out, values, strict=True)) for values in zip(*out.values(), strict=True)]
        first = first if first is not None else now() - t0
    gen_done = now()
    trainer = Trainer(0, 1, tr.backend, tr.zero_stage, tr.precision)
    trainer.load(str(path))
    trainer.begin(setup_for(cfg, rows.num_rows))
    train_start = now()
    records = trainer.train_epoch(ListShard(generated))
    end = now()
    return {"total_s": end - t0, "engine_load_s": loaded - t0, "generation_s": gen_done - loaded,
            "trainer_setup_s": train_start - gen_done, "training_s": end - train_start, "first_batch_s": first,
            "steps": len(records), "tokens": sum(int(r["gen_tokens"]) for r in generated),
            "threads": torch.get_num_threads()}


def ray_pipeline(cfg, path, rows, out_dir) -> dict:
    """The same work as Driver.iteration's streamed epoch: generation_dataset -> TrainerGroup.train_stream."""
    import numpy as np

    from tspin_ray.controller.trainer_group import TrainerGroup
    from tspin_ray.rollout.shards import read_shards

    t0 = now()
    group = TrainerGroup(cfg)
    try:
        group.load(path)
        group.begin(setup_for(cfg, rows.num_rows))
        stream_start, stream_wall = now(), time.time()
        records = group.train_stream(generation(cfg, rows, gen_phase(cfg, path, out_dir)))
        end = now()
    finally:
        group.shutdown()
    table = read_shards(out_dir)
    done = table.column("gen_done").to_numpy()
    return {"total_s": end - t0, "trainer_setup_s": stream_start - t0, "stream_s": end - stream_start,
            "first_batch_s": float(np.min(done) - stream_wall), "generation_s": float(np.max(done) - stream_wall),
            "engine_load_s": float(np.max(table.column("engine_load_s").to_numpy())), "steps": len(records),
            "tokens": int(np.sum(table.column("gen_tokens").to_numpy()))}


def run_ray_overhead(ctx: Context) -> dict:
    s = ctx.sizes(SIZES)
    cfg, path, rows = overhead_inputs(ctx, s)
    single = single_process(cfg, path, rows, ctx.work / "single")
    with ray_session() as ray_start_s:
        threads = actor_threads(cfg.resources.trainer_cpus)
        piped = ray_pipeline(cfg, path, rows, ctx.work / "ray")
    comparisons = [
        compare("same work, end to end", "seconds", "single process", single["total_s"], "Ray pipeline",
                piped["total_s"], higher_is_better=False, target="<= 1.2x"),
        compare("same work + ray.init", "seconds", "single process", single["total_s"], "Ray pipeline + ray.init",
                piped["total_s"] + ray_start_s, higher_is_better=False),
        compare("setup before generating", "seconds", "single: engine load", single["engine_load_s"],
                "Ray: trainer group start + load", piped["trainer_setup_s"], higher_is_better=False),
        compare("first generated batch", "seconds", "single: engine load + 1 batch", single["first_batch_s"],
                "Ray: stream start -> first batch", piped["first_batch_s"], higher_is_better=False),
    ]
    rows_table = [
        ["single process", single["total_s"], single["engine_load_s"], single["generation_s"],
         single["trainer_setup_s"], single["training_s"], single["tokens"], single["steps"], single["threads"]],
        ["Ray pipeline", piped["total_s"], piped["engine_load_s"], piped["generation_s"], piped["trainer_setup_s"],
         piped["stream_s"], piped["tokens"], piped["steps"], threads],
    ]
    return {
        "comparisons": comparisons, "config": s, "details": {"single": single, "ray": piped, "ray_start_s": ray_start_s},
        "tables": [{"title": "Where the time goes", "columns": [
            "path", "total s", "engine load s", "generation s", "trainer setup s", "training / stream s",
            "generated tokens", "steps", "torch threads"], "rows": rows_table}],
        "notes": [
            f"{rows.num_rows} prompts, generation batch {cfg.generation.batch_size}, max_new_tokens "
            f"{cfg.generation.max_new_tokens}, T-SPIN on a torch trainer, global batch {cfg.training.global_batch_size}; "
            "pi_t is the random tiny model, so responses run longer than after SFT (see the iteration benchmark).",
            f"Ray's costs: ray.init {ray_start_s:.1f} s (once per job), the trainer actor's process start and "
            f"process group ({piped['trainer_setup_s']:.1f} s with the checkpoint load), and the generator actor "
            f"starting inside Ray Data's execution (first batch after {piped['first_batch_s']:.1f} s, of which "
            f"{piped['engine_load_s']:.1f} s engine load). In return generation and training run at once on separate "
            "cores (Ray's generation s is when its last batch finished, inside the stream).",
            f"Threads: the single process uses {single['threads']} torch intra-op thread(s) in both phases (--threads; "
            "default: all cores); "
            f"each Ray actor gets OMP_NUM_THREADS = num_cpus = {threads}. On a busy machine extra threads hurt "
            "(OpenMP barriers wait for descheduled threads): compare on a quiet one.",
        ],
    }


# ------------------------------------------------------------ long-lived generators
def run_persistent(ctx: Context) -> dict:
    """The same run (SFT, y0, N iterations) with the default per-phase generator pool and with long-lived
    generators + the broadcast weight sync: seconds per iteration, where the per-phase actor start goes."""
    from tspin_ray.config.schema import from_dict
    from tspin_ray.controller.driver import Driver
    from tspin_ray.controller.prepare import prepare
    from tspin_ray.rundir.metrics import read_rows

    s = ctx.sizes(SIZES)
    iterations = 3 if ctx.quick else 4
    ways = {"per-phase pool": {}, "long-lived + broadcast": {"persistent": True, "weight_sync": "broadcast"}}
    figures = {}
    for name, gen in ways.items():
        raw = run_config(s, ctx.work / name.replace(" ", "_"))
        raw["iterations"] = iterations
        raw["generation"].update(gen)
        with ray_session():
            driver = Driver(prepare(from_dict(raw)), quiet=True)
            try:
                t0 = now()
                driver.run_all()
                total = now() - t0
            finally:
                driver.close()
        its = [r for r in read_rows(Path(raw["output_dir"]) / "metrics.jsonl")
               if r.get("phase") == "iteration" and r.get("iteration", -1) >= 0]
        steady = its[1:]  # iteration 0 of both pays the first engine start
        figures[name] = {
            "run_s": total, "iteration_s": [r["timing/iteration"] for r in its],
            "steady_iteration_s": sum(r["timing/iteration"] for r in steady) / len(steady),
            "weight_sync_s": sum(r["timing/weight_sync"] for r in steady) / len(steady),
            "generate_s": sum(r["timing/generate"] for r in steady) / len(steady),
        }
    a, b = figures["per-phase pool"], figures["long-lived + broadcast"]
    return {
        "comparisons": [
            compare("seconds per iteration (iterations 1+)", "seconds", "per-phase pool", a["steady_iteration_s"],
                    "long-lived + broadcast", b["steady_iteration_s"], higher_is_better=False),
            compare("whole run", "seconds", "per-phase pool", a["run_s"], "long-lived + broadcast", b["run_s"],
                    higher_is_better=False),
        ],
        "config": {**s, "iterations": iterations}, "details": figures,
        "tables": [{"title": "Per iteration (means over iterations 1+)", "columns":
                    ["mode", "iteration s", "generate s", "weight sync s", "whole run s"],
                    "rows": [[n, f["steady_iteration_s"], f["generate_s"], f["weight_sync_s"], f["run_s"]]
                             for n, f in figures.items()]}],
        "notes": [f"{iterations} T-SPIN iterations on the `iteration` benchmark's config, 1 generator actor and "
                  "1 trainer each. Per-phase: every generation and evaluation phase starts a Ray Data actor "
                  "that loads the committed checkpoint (weight sync = that engine load). Long-lived: the actors "
                  "start once; pi_{t+1} is broadcast from trainer rank 0 (gloo here, NCCL on GPUs) before its "
                  "evaluation."],
    }
