"""The GPU check after the kit is installed: environment, gpu tests, one whole run per objective, GPU benches.

    bash bench/gpu_kit/run.sh OUTDIR        (installs the kit, then: python -m bench.gpu_kit.check OUTDIR)

Every step runs in its own child process under a share of one time budget (--budget: 480 s with CUDA,
1800 s without; counted from run.sh's start) and records ok / fail / skip with one line of why in OUTDIR/summary.json,
rewritten after each step, so a machine taken back mid-way still leaves what was done. Without CUDA the
GPU-only steps skip with a line saying so and the runs go on CPU (fp32, a smaller model): that is how the
kit is proven offline here (tests/test_gpu_kit.py). OUTDIR gets three files, within a device call's limit
of 8: summary.json, check.log (everything printed) and details.tar.gz (child logs, bench JSON/Markdown,
each run's metrics.jsonl).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bench  # noqa: F401  (sets the process environment before torch, transformers or ray load)
from bench.__main__ import BENCHMARKS, child_env, one_line, run_one, stop

REPO = Path(__file__).resolve().parents[2]
KIT = Path(__file__).resolve().parent
# objective -> the model family its run uses (tspin_ray/families.py): each real family trains once.
RUNS = {"sft": "zephyr", "spin": "llama3", "tspin": "qwen2", "space": "llama3"}
CPU_RUN = ["model.dtype=float32", "training.precision=fp32", "resources.trainer_gpus=0",
           "resources.generator_gpus=0", "model.tiny.hidden_size=64", "model.tiny.num_layers=2",
           "model.tiny.num_heads=2", "model.tiny.intermediate_size=128", "data.task_size=128", "data.eval_size=32"]
GPU_BENCHES = ("trainer", "trainer_memory", "generation", "weight_sync")
# Import names of image.txt's distributions where they differ.
MODULES = {"pyyaml": "yaml", "py-cpuinfo": "cpuinfo", "protobuf": "google.protobuf", "attrs": "attr",
           "pytest": "pytest"}


@dataclass
class Step:
    name: str
    status: str  # ok | fail | skip
    seconds: float
    line: str  # one line: what was found, or why it failed or skipped
    details: dict = field(default_factory=dict)


class Check:
    def __init__(self, out: Path, budget_s: float | None, t0: float):
        # Scratch outside OUTDIR: a device call returns at most 8 files from it.
        self.out, self.work = out, Path(tempfile.mkdtemp(prefix="tspin-gpu-kit-"))
        import torch

        self.gpu = torch.cuda.is_available()
        self.deadline, self.steps = t0 + (budget_s or (480.0 if self.gpu else 1800.0)), []
        self.log = open(out / "check.log", "a")  # noqa: SIM115 (closed by finish)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.deadline - time.time()

    def record(self, step: Step) -> Step:
        self.steps.append(step)
        self.say(f"[{step.status:>4}] {step.name} ({step.seconds:.0f} s): {step.line}")
        summary = {"gpu": self.gpu, "seconds_left": round(self.left(), 1), "steps": [asdict(s) for s in self.steps],
                   "ok": all(s.status != "fail" for s in self.steps)}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        return step

    def child(self, name: str, argv: list[str], cap_s: float) -> tuple[int | None, float, Path]:
        """Run argv (a child process group) for at most cap_s and what is left of the budget; rc None = killed."""
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        limit = max(1.0, min(cap_s, self.left()))
        t0 = time.time()
        with open(log, "w") as f:
            proc = subprocess.Popen(argv, cwd=REPO, env=child_env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                stop(proc)
                rc = None
        return rc, time.time() - t0, log

    def out_of_time(self, name: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return False
        self.record(Step(name, "skip", 0.0, f"not started: {self.left():.0f} s of the budget left, needs ~{need_s:.0f}"))
        return True

    def finish(self) -> bool:
        with tarfile.open(self.out / "details.tar.gz", "w:gz") as tar:
            tar.add(self.work, arcname="details")
        ok = all(s.status != "fail" for s in self.steps)
        self.say(f"{'PASSED' if ok else 'FAILED'}: " + ", ".join(f"{s.name} {s.status}" for s in self.steps))
        self.say(f"details (child logs, bench JSON, run metrics): {self.out / 'details.tar.gz'}")
        shutil.rmtree(self.work, ignore_errors=True)
        self.log.close()
        return ok


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


# ------------------------------------------------------------ steps
def environment(c: Check) -> Step:
    """Versions, the image's packages, and the kit's imports coming from the kit (not from elsewhere)."""
    import torch

    t0, missing, versions = time.time(), [], {}
    wanted = [ln.split("#")[0].strip() for ln in (KIT / "image.txt").read_text().splitlines()]
    for dist in filter(None, wanted):
        try:
            importlib.import_module(MODULES.get(dist, dist.replace("-", "_")))
            versions[dist] = importlib.metadata.version(dist)
        except Exception as e:  # noqa: BLE001  (any import failure is the finding)
            missing.append(f"{dist} ({type(e).__name__})")
    for module in ("ray", "ray.data", "deepspeed", "pydantic", "jsonschema", "tspin_ray.driver"):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001
            missing.append(f"{module} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    import deepspeed
    import ray

    site = os.environ.get("KIT_SITE", "")
    foreign = [m.__name__ for m in (ray, deepspeed) if site and not str(Path(m.__file__).resolve()).startswith(
        str(Path(site).resolve()))]
    details = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(0) if c.gpu else None, "ray": ray.__version__,
               "deepspeed": deepspeed.__version__, "image": versions}
    seconds = time.time() - t0
    if missing or foreign:
        why = (f"missing: {', '.join(missing)}" if missing else "") + \
              (f"; not from the kit ({site}): {', '.join(foreign)}" if foreign else "")
        return c.record(Step("environment", "fail", seconds, why.strip("; "), details))
    where = details["gpu"] or "no CUDA (CPU stand-in)"
    return c.record(Step("environment", "ok", seconds, f"Python {details['python']}, torch {details['torch']}, "
                         f"ray {details['ray']}, deepspeed {details['deepspeed']}; {where}", details))


def gpu_tests(c: Check) -> Step:
    """tests/test_gpu.py: those that need neither vLLM nor two GPUs run; the rest skip (pytest -rs says why)."""
    if c.out_of_time("gpu_tests", 60):
        return c.steps[-1]
    xml = c.work / "gpu_tests.xml"
    rc, seconds, log = c.child("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu",
                                             "-p", "no:cacheprovider", f"--junitxml={xml}", "tests/test_gpu.py"], 240)
    if rc is None or not xml.exists():
        return c.record(Step("gpu_tests", "fail", seconds, f"pytest {'timed out' if rc is None else f'exited {rc}'}: "
                             f"{last_line(log)}"))
    import xml.etree.ElementTree as ET

    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    line = f"{passed} passed, {n['skipped']} skipped, {n['failures'] + n['errors']} failed of {n['tests']}"
    if rc != 0 or n["failures"] or n["errors"]:
        return c.record(Step("gpu_tests", "fail", seconds, f"{line}: {last_line(log)}", n))
    if passed == 0:
        return c.record(Step("gpu_tests", "skip", seconds, f"{line} (no CUDA: every gpu test skips)", n))
    return c.record(Step("gpu_tests", "ok", seconds, line, n))


def objective_run(c: Check, objective: str, family: str) -> Step:
    """A whole 2-iteration run (SFT for pi_0, then self-play) through the CLI, read back with load_run."""
    from tspin_ray.run_reader import load_run

    name = f"run_{objective}"
    if c.out_of_time(name, 45):
        return c.steps[-1]
    run_dir = c.work / "runs" / objective
    argv = [sys.executable, "-m", "tspin_ray", "train", "--quiet", "--config", str(KIT / "run.yaml"),
            f"objective.name={objective}", f"model.tiny.family={family}", f"output_dir={run_dir}",
            *([] if c.gpu else CPU_RUN)]
    rc, seconds, log = c.child(name, argv, 150 if c.gpu else 400)
    where = "GPU, bf16" if c.gpu else "CPU stand-in, fp32"
    if rc != 0:
        return c.record(Step(name, "fail", seconds, f"{family}, {where}: "
                             f"{'timed out' if rc is None else f'exited {rc}'}: {last_line(log)}"))
    run = load_run(run_dir)
    losses = [r.get("loss") for r in run.train]
    finite = bool(losses) and all(isinstance(v, float) and v == v and abs(v) != float("inf") for v in losses)
    details = {"family": family, "iterations": run.completed, "complete": run.complete, "train_steps": len(losses),
               **{f"iter{t}/{k}": v for t, row in run.iterations.items() for k, v in row.items()
                  if k.startswith(("timing/", "eval/"))}}
    if not (run.complete and run.completed == 2 and finite):
        return c.record(Step(name, "fail", seconds, f"{family}, {where}: complete={run.complete}, "
                             f"{run.completed} of 2 iterations, {len(losses)} train steps, losses finite={finite}",
                             details))
    acc, nll = run.final("eval/exact_match"), [run.value(t, "eval/nll") for t in (-1, max(run.iterations))]
    return c.record(Step(name, "ok", seconds, f"{family}, {where}: 2 iterations, {len(losses)} logged train steps"
                         + (f", exact match {acc[1]:.3f}" if acc else "")
                         + (f", held-out NLL pi_0 {nll[0]:.3f} -> pi_2 {nll[1]:.3f}" if None not in nll else ""),
                         details))


def gpu_benches(c: Check) -> list[Step]:
    """The GPU sizes of bench/: trainer tokens/s + MFU, ZeRO-3 memory, HF generation, checkpoint I/O."""
    from bench.report import markdown

    if not c.gpu:
        return [c.record(Step(f"bench_{n}", "skip", 0.0, "no CUDA: GPU sizes only (python -m bench runs the CPU "
                              "ones)")) for n in GPU_BENCHES]
    doc, steps = {"suite": "tspin-ray bench (gpu kit)", "schema": 1, "mode": "full", "benchmarks": {}}, []
    for name in GPU_BENCHES:
        if c.out_of_time(f"bench_{name}", 40):
            steps.append(c.steps[-1])
            continue
        t0 = time.time()
        result = run_one(name, False, None, max(1.0, min(240.0, c.left())), c.work / "logs" / f"bench_{name}.log")
        result["title"] = BENCHMARKS[name][1]
        doc["benchmarks"][name] = result
        status = "fail" if str(result.get("skipped", "")).startswith(("failed", "child exited")) else \
            "skip" if "skipped" in result else "ok"
        steps.append(c.record(Step(f"bench_{name}", status, time.time() - t0, one_line(result))))
    (c.work / "bench.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (c.work / "bench.md").write_text(markdown(doc))
    return steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_kit.check", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for summary.json, check.log and details.tar.gz")
    p.add_argument("--budget", type=float, help="seconds for everything, from --t0 (default: 480 with CUDA, "
                                                 "1800 on the CPU stand-in, whose runs are slower)")
    p.add_argument("--t0", type=float, default=None, help="when the check started (run.sh passes its start)")
    p.add_argument("--skip-runs", action="store_true", help="leave out the four whole runs")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    c = Check(args.out, args.budget, args.t0 or time.time())
    if environment(c).status == "ok":
        gpu_tests(c)
        for objective, family in ({} if args.skip_runs else RUNS).items():
            objective_run(c, objective, family)
        gpu_benches(c)
    return 0 if c.finish() else 1


if __name__ == "__main__":
    sys.exit(main())
