"""Run the benchmark suite and write bench-<timestamp>.json / .md (and latest.json / latest.md).

    .venv/bin/python -m bench [--quick] [--out bench/results] [--only NAME ...] [--timeout SECONDS] [--repeats N]

Each benchmark runs in its own child process (`--child NAME`, internal): vLLM-CPU pins the OpenMP threads
of the process that starts it, DeepSpeed and vLLM leave process groups behind, and a benchmark that
crashes or hangs must cost only its own entry ({"skipped": reason}), never the suite. A child that uses
Ray starts a local Ray and shuts it down before it exits. Its output goes to <out>/logs/.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import bench  # noqa: F401  (sets the process environment before torch, transformers or vLLM load)
from bench.common import REPO, Context, Skip

BENCHMARKS = {
    "generation": ("bench.generation:run", "Generation tokens/s: vLLM vs HF generate"),
    "logprob_parity": ("bench.generation:run_parity", "Reference log-probs: vLLM prompt_logprobs vs the trainer forward"),
    "trainer": ("bench.training:run", "Trainer tokens/s: DeepSpeed ZeRO-0 / 2 / 3 vs plain torch"),
    "trainer_real": ("bench.training:run_real", "Trainer tokens/s on SmolLM2-135M-Instruct: ZeRO-0 / 2 / 3 vs plain torch"),
    "trainer_memory": ("bench.training:run_memory", "Trainer memory at load: ZeRO-3 zero.Init vs ZeRO-2"),
    "weight_sync": ("bench.weights:run", "Weight sync: in-place reload vs a cold engine start; checkpoint I/O"),
    "iteration": ("bench.pipeline:run_iteration", "One self-play iteration: wall time, breakdown, overlap"),
    "ray_overhead": ("bench.pipeline:run_ray_overhead", "Ray pipeline vs a single-process loop, same work"),
    "self_play": ("bench.self_play:run", "tspin-ray train vs the same iterations in one process, equal work"),
    "scaling": ("bench.scaling:run", "Generation throughput with 1, 2 and 4 generator actors"),
    "persistent": ("bench.pipeline:run_persistent", "Long-lived generators + broadcast vs the per-phase pool"),
    "resume": ("bench.resume:run", "Resume with 90% of a generation on disk: start to the first new batch"),
    "logprob_memory": ("bench.logprobs:run", "Log-probs at 128k and 152k vocabularies: full logits vs chunked, the head's gradient in place"),
    "padding": ("bench.padding:run", "Mixed-length T-SPIN rows: a padded row per sequence vs packed rows"),
    "generator_pull": ("bench.pull:run", "Two long-lived generators, one slowed: round robin vs pulled by idle ones"),
    "lora": ("bench.lora:run", "LoRA vs full weights: bytes and seconds per sync, trainer peak memory of a step"),
    "denormals": ("bench.denormals:run", "CPU trainer steps on the real model's own samples: subnormal floats "
                                         "kept vs flushed"),
    "self_play_real": ("bench.self_play:run_real", "self_play on the real model (SmolLM2, jobs/demo-real.yaml)"),
    "real_generation": ("bench.real_generation:run", "The real model (SmolLM2-135M-Instruct): vLLM (prefix caching "
                                                     "on / off) vs HF generate tokens/s"),
    # last: it takes and frees up to 16 GiB, which changes what the memory of a benchmark after it costs
    "page_faults": ("bench.page_faults:run", "First touches of fresh memory: microseconds a fault, by how deep "
                                             "into free memory they reach"),
}
TIMEOUT_S = {"quick": 300.0, "full": 900.0}
FULL_TIMEOUT_S = {"self_play_real": 2400.0}  # 5 repeats of three whole commands on the real model (~20 min)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: the whole suite in a few minutes")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="where the JSON and Markdown go")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                   help=f"run only these, of: {', '.join(BENCHMARKS)}")
    p.add_argument("--timeout", type=float,
                   help="seconds per benchmark (default 300 quick, 900 full; self_play_real 2400)")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads of in-process work (default: all cores; 1 with --quick, so a "
                        "busy machine does not stall on OpenMP barriers)")
    p.add_argument("--repeats", type=int,
                   help="repeats of the benchmarks that alternate a baseline and a candidate (default: their sizes' own)")
    p.add_argument("--child", choices=list(BENCHMARKS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------ child: one benchmark in this process
def run_child(name: str, quick: bool, threads: int | None, repeats: int | None, result_path: Path) -> None:
    # SIGTERM (the parent's timeout) unwinds normally, so `finally` blocks shut Ray down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if threads:
        import torch

        # This process only: Ray actors still get OMP_NUM_THREADS = their num_cpus.
        torch.set_num_threads(threads)
    module, func = BENCHMARKS[name][0].split(":")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as work:
        try:
            result = getattr(importlib.import_module(module), func)(Context(quick=quick, work=Path(work), repeats=repeats))
        except Skip as e:
            result = {"skipped": str(e)}
        except Exception as e:  # recorded in the report; the traceback is in the log
            traceback.print_exc()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            result = {"skipped": f"failed: {type(e).__name__}: {first}"[:500]}
    result["wall_s"] = time.time() - t0
    result_path.write_text(json.dumps(result, indent=1, default=_json_default))


def _json_default(x):
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ------------------------------------------------------------ parent: the suite
def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("RAY_ADDRESS", "TSPIN_FAULT"):  # a local Ray; no injected faults
        env.pop(key, None)
    return env


def run_one(name: str, quick: bool, threads: int | None, repeats: int | None, timeout: float, log: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-result-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench", "--child", name, "--result", str(result)] + (["--quick"] if quick else []) \
            + (["--threads", str(threads)] if threads else []) + (["--repeats", str(repeats)] if repeats else [])
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop(proc)
                return {"skipped": f"timed out after {timeout:.0f} s (see the log)", "log": str(log)}
        if result.exists():
            return {**json.loads(result.read_text()), "log": str(log)}
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return {"skipped": f"child exited with {proc.returncode} and no result: {lines[-1] if lines else ''}"[:500],
            "log": str(log)}


def stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM the child (its handler shuts Ray down), then SIGKILL its whole session if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: only what it started
    except ProcessLookupError:
        pass
    proc.wait()


def one_line(result: dict) -> str:
    from bench.report import headline

    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    c = headline(result)
    if c is None:
        return "no comparison measured"
    return (f"{c['name']}: {c['baseline']} {c['baseline_value']:.4g} -> {c['candidate']} {c['value']:.4g} "
            f"{c['metric']} ({c['ratio']:.2f}x)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, args.quick, args.threads, args.repeats, Path(args.result))
        return 0
    from bench.machine import describe
    from bench.report import markdown

    mode = "quick" if args.quick else "full"
    names = args.only or list(BENCHMARKS)
    threads = args.threads or (1 if args.quick else None)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    doc = {"suite": "tspin-ray bench", "schema": 1, "mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": " ".join(["python -m bench", *sys.argv[1:]]), "machine": describe(),
           "in_process_threads": threads or "torch default", "repeats": args.repeats or "each benchmark's own",
           "benchmarks": {}}
    t0 = time.time()
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}: {BENCHMARKS[name][1]} ...", file=sys.stderr, flush=True)
        timeout = args.timeout or (TIMEOUT_S[mode] if args.quick else FULL_TIMEOUT_S.get(name, TIMEOUT_S["full"]))
        result = run_one(name, args.quick, threads, args.repeats, timeout, out / "logs" / f"{stamp}-{name}.log")
        result["title"] = BENCHMARKS[name][1]
        doc["benchmarks"][name] = result
        print(f"    {result.get('wall_s', 0):.0f} s  {one_line(result)}", file=sys.stderr, flush=True)
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc["wall_s"] = time.time() - t0
    doc["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path, md_path = out / f"bench-{stamp}.json", out / f"bench-{stamp}.md"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(markdown(doc))
    shutil.copyfile(json_path, out / "latest.json")
    shutil.copyfile(md_path, out / "latest.md")
    print(f"wrote {json_path} and {md_path} ({doc['wall_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
