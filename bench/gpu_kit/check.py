"""The GPU check after the kit is installed: environment, gpu tests, one whole run per objective, GPU benches.

    bash bench/gpu_kit/run.sh OUTDIR        (installs the kit, then: python -m bench.gpu_kit.check OUTDIR)

Every step runs in its own child process under a share of one time budget (--budget: 480 s with CUDA,
1800 s without; counted from run.sh's start) and records ok / fail / skip with one line of why in OUTDIR/summary.json,
rewritten after each step, so a machine taken back mid-way still leaves what was done. Without CUDA the
GPU-only steps skip with a line saying so and the runs go on CPU (fp32, a smaller model): that is how the
kit is proven offline here (tests/deploy/test_gpu_kit.py). OUTDIR gets three files, within a device call's limit
of 8: summary.json, check.log (everything printed) and details.tar.gz (child logs, bench JSON/Markdown,
each run's metrics.jsonl).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import re
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
# objective -> the model family its run uses (tspin_ray/models/families.py): each real family trains once.
RUNS = {"sft": "zephyr", "spin": "llama3", "tspin": "qwen2", "space": "llama3"}
CPU_RUN = ["model.dtype=float32", "training.precision=fp32", "resources.trainer_gpus=0",
           "resources.generator_gpus=0", "model.tiny.hidden_size=64", "model.tiny.num_layers=2",
           "model.tiny.num_heads=2", "model.tiny.intermediate_size=128", "data.task_size=128", "data.eval_size=32"]
# name -> (seconds it needs to be worth starting, its cap): on an H200 they should fit in ~4 of the 8 minutes.
GPU_BENCHES = {"trainer": (60, 110), "logprob_memory": (60, 120), "trainer_memory": (45, 90), "generation": (30, 60),
               "weight_sync": (45, 90)}
# The torch the project's CPU suite runs on (Makefile); the image brings its own CUDA build (image.txt).
PROJECT_TORCH = "2.13.0"
# Import names of image.txt's distributions where they differ.
MODULES = {"pyyaml": "yaml", "py-cpuinfo": "cpuinfo", "protobuf": "google.protobuf", "attrs": "attr",
           "pytest": "pytest"}


@dataclass
class Step:
    name: str
    status: str  # ok | fail | cut (stopped by its cap or the budget) | skip (not run, with why)
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

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        """Start argv in its own process group, output to logs/<name>.log."""
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.Popen(argv, cwd=REPO, env={**child_env(), **(env or {})}, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return proc, log

    def reap(self, proc: subprocess.Popen, cap_s: float) -> int | None:
        """Wait at most cap_s and what is left of the budget; None = it was stopped (10 s to shut down)."""
        try:
            return proc.wait(timeout=max(1.0, min(cap_s, self.left())))
        except subprocess.TimeoutExpired:
            stop(proc, grace_s=10.0)
            return None

    def child(self, name: str, argv: list[str], cap_s: float) -> tuple[int | None, float, Path]:
        """Run argv to the end or for at most cap_s (and the budget): (rc or None, seconds, log)."""
        t0 = time.time()
        proc, log = self.spawn(name, argv)
        return self.reap(proc, cap_s), time.time() - t0, log

    def out_of_time(self, name: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return False
        self.record(Step(name, "skip", 0.0, f"not started: {self.left():.0f} s of the budget left, needs ~{need_s:.0f}"))
        return True

    def finish(self) -> bool:
        # Of each run only what a reader needs: not its checkpoints and shards (hundreds of MB of random weights).
        def small(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            parts = Path(info.name).parts[1:]  # below details/
            if parts[:1] != ("runs",) or len(parts) <= 2:
                return info
            return info if len(parts) == 3 and parts[2] in ("metrics.jsonl", "config.yaml", "manifest.json") else None

        with tarfile.open(self.out / "details.tar.gz", "w:gz") as tar:
            tar.add(self.work, arcname="details", filter=small)
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
    for module in ("ray", "ray.data", "deepspeed", "pydantic", "jsonschema", "tspin_ray.controller.driver"):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001
            missing.append(f"{module} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    if missing:
        return c.record(Step("environment", "fail", time.time() - t0, f"missing: {', '.join(missing)}", versions))
    import deepspeed
    import ray

    site = os.environ.get("KIT_SITE", "")
    foreign = [m.__name__ for m in (ray, deepspeed) if site and not str(Path(m.__file__).resolve()).startswith(
        str(Path(site).resolve()))]
    details = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(0) if c.gpu else None, "ray": ray.__version__,
               "deepspeed": deepspeed.__version__, "image": versions, "project_torch": PROJECT_TORCH}
    seconds = time.time() - t0
    if foreign:
        return c.record(Step("environment", "fail", seconds, f"not from the kit ({site}): {', '.join(foreign)}",
                             details))
    where = details["gpu"] or "no CUDA (CPU stand-in)"
    return c.record(Step("environment", "ok", seconds, f"Python {details['python']}, torch {details['torch']} (the "
                         f"project pins {PROJECT_TORCH}: a figure here is for this build), "
                         f"ray {details['ray']}, deepspeed {details['deepspeed']}; {where}", details))


def gpu_tests(c: Check) -> Step:
    """tests/gpu/test_gpu.py: those that need neither vLLM nor two GPUs run; the rest skip (pytest -rs says why)."""
    if c.out_of_time("gpu_tests", 60):
        return c.steps[-1]
    xml = c.work / "gpu_tests.xml"
    rc, seconds, log = c.child("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu",
                                             "-p", "no:cacheprovider", f"--junitxml={xml}", "tests/gpu/test_gpu.py"], 150)
    if rc is None:
        return c.record(Step("gpu_tests", "cut", seconds, f"stopped at its cap or the budget: {last_line(log)}"))
    if not xml.exists():
        return c.record(Step("gpu_tests", "fail", seconds, f"pytest exited {rc}: {last_line(log)}"))
    import xml.etree.ElementTree as ET

    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    line = f"{passed} passed, {n['skipped']} skipped, {n['failures'] + n['errors']} failed of {n['tests']}"
    if rc != 0 or n["failures"] or n["errors"]:
        return c.record(Step("gpu_tests", "fail", seconds, f"{line}: {last_line(log)}", n))
    if passed == 0:
        if c.gpu:
            return c.record(Step("gpu_tests", "fail", seconds, f"{line}, with CUDA present: {last_line(log)}", n))
        return c.record(Step("gpu_tests", "skip", seconds, f"{line} (no CUDA: every gpu test skips)", n))
    return c.record(Step("gpu_tests", "ok", seconds, line, n))


def run_argv(c: Check, objective: str, family: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "tspin_ray", "train", "--quiet", "--config", str(KIT / "run.yaml"),
            f"objective.name={objective}", f"model.tiny.family={family}",
            f"output_dir={c.work / 'runs' / objective}", *extra]


def read_run(c: Check, objective: str, family: str, rc: int | None, seconds: float, log: Path) -> Step:
    """A run's verdict from its exit status and its run directory, read back with load_run."""
    from tspin_ray.analysis.run_reader import load_run

    name, where = f"run_{objective}", "GPU, bf16" if c.gpu else "CPU stand-in, fp32"
    root = c.work / "runs" / objective
    done = (root / "manifest.json").exists() and load_run(root).complete
    if rc is None and not done:
        return c.record(Step(name, "cut", seconds, f"{family}, {where}: stopped at its cap or the budget: "
                             f"{last_line(log)}"))
    if rc not in (0, None):
        return c.record(Step(name, "fail", seconds, f"{family}, {where}: exited {rc}: {last_line(log)}"))
    run = load_run(root)
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
                         + (" (stopped after it had committed its last iteration)" if rc is None else "")
                         + (f", exact match {acc[1]:.3f}" if acc else "")
                         + (f", held-out NLL pi_0 {nll[0]:.3f} -> pi_2 {nll[1]:.3f}" if None not in nll else ""),
                         details))


def objective_runs(c: Check, parallel: bool) -> None:
    """A whole 2-iteration run of each objective (SFT for pi_0, then self-play) through the CLI.

    Sequential: each run starts its own local Ray. Parallel (the GPU default): one `ray start --head` and
    the four runs at once as its jobs, each with an eighth of the GPU per actor, so the fixed costs of four
    runs (Ray, actor and DeepSpeed start, exports) overlap instead of adding up.
    """
    if not parallel:
        for objective, family in RUNS.items():
            if not c.out_of_time(f"run_{objective}", 45):
                rc, seconds, log = c.child(f"run_{objective}", run_argv(c, objective, family, [] if c.gpu else CPU_RUN),
                                           150 if c.gpu else 400)
                read_run(c, objective, family, rc, seconds, log)
        return
    if c.out_of_time("runs", 60):
        return
    import secrets

    port = free_port()
    # Ray 2.60 clusters take token authentication by default: the head and its drivers share one token.
    # Their own RAY_TMPDIR (short: socket paths have a limit): the head's ray_current_cluster file, left
    # behind when it stops, must not send the benches' later local ray.init() to a dead cluster.
    tmp = tempfile.mkdtemp(prefix="tkr-", dir="/tmp")
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_TMPDIR": tmp}
    head, head_log = c.spawn("ray_head", [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                                          "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
                                          "--disable-usage-stats", f"--num-cpus={max(16, 2 * (os.cpu_count() or 1))}"],
                             {**auth, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    try:
        if not wait_for_port(port, 60):
            for objective, family in RUNS.items():
                c.record(Step(f"run_{objective}", "fail", 0.0, f"{family}: ray start --head did not come up in 60 s: "
                              f"{last_line(head_log)}"))
            return
        share = ["resources.trainer_gpus=0.125", "resources.generator_gpus=0.125"] if c.gpu else CPU_RUN
        t0 = time.time()
        jobs = {o: c.spawn(f"run_{o}", run_argv(c, o, f, share), {**auth, "RAY_ADDRESS": f"127.0.0.1:{port}"})
                for o, f in RUNS.items()}
        for objective, (proc, log) in jobs.items():
            rc = c.reap(proc, (240 if c.gpu else 900) - (time.time() - t0))  # the caps count from the start
            read_run(c, objective, RUNS[objective], rc, time.time() - t0, log)
    finally:
        stop(head, grace_s=20.0)
        shutil.rmtree(tmp, ignore_errors=True)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, seconds: float) -> bool:
    import socket

    deadline = time.time() + seconds
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.5)
    return False


def bench_status(result: dict) -> str:
    """ok, cut (its cap), or fail: the child crashed, or a variant raised (its comparison says which)."""
    reason = str(result.get("skipped", ""))
    if reason.startswith("timed out"):
        return "cut"
    raised = [c for c in result.get("comparisons", []) if re.match(r"\w+(Error|Exception)\b", c.get("skipped", ""))]
    if reason.startswith(("failed", "child exited")) or raised:
        return "fail"
    return "skip" if reason else "ok"


def gpu_benches(c: Check) -> None:
    """The GPU sizes of bench/: trainer tokens/s + MFU, ZeRO-3 memory, HF generation, checkpoint I/O."""
    from bench.machine import describe
    from bench.report import markdown

    if not c.gpu:
        for name in GPU_BENCHES:
            c.record(Step(f"bench_{name}", "skip", 0.0, "no CUDA: GPU sizes only (python -m bench runs the CPU ones)"))
        return
    doc = {"suite": "tspin-ray bench (gpu kit)", "schema": 1, "mode": "full", "machine": describe(),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": "bash bench/gpu_kit/run.sh",
           "benchmarks": {}}
    (c.work / "logs").mkdir(exist_ok=True)
    for name, (need_s, cap_s) in GPU_BENCHES.items():
        if c.out_of_time(f"bench_{name}", need_s):
            continue
        t0 = time.time()
        result = run_one(name, False, None, None, max(1.0, min(cap_s, c.left())), c.work / "logs" / f"bench_{name}.log")
        result["title"] = BENCHMARKS[name][1]
        doc["benchmarks"][name] = result
        c.record(Step(f"bench_{name}", bench_status(result), time.time() - t0, one_line(result)))
        (c.work / "bench.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")  # after each: a cut
    (c.work / "bench.md").write_text(markdown(doc))


def guarded(c: Check, name: str, step, *args) -> None:
    """A step that raises is a fail line, not a crashed check: the later steps and the archive still come."""
    t0 = time.time()
    try:
        step(c, *args)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        c.record(Step(name, "fail", time.time() - t0, f"the check itself raised {type(e).__name__}: {first}"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_kit.check", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for summary.json, check.log and details.tar.gz")
    p.add_argument("--budget", type=float, help="seconds for everything, from --t0 (default: 480 with CUDA, "
                                                 "1800 on the CPU stand-in, whose runs are slower)")
    p.add_argument("--t0", type=float, default=None, help="when the check started (run.sh passes its start)")
    p.add_argument("--skip-runs", action="store_true", help="leave out the four whole runs")
    p.add_argument("--runs", choices=["parallel", "sequential"],
                   help="the four runs at once on one Ray (default with CUDA) or one after another (default without)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    c = Check(args.out, args.budget, args.t0 or time.time())
    try:
        guarded(c, "environment", environment)
        if c.steps[-1].status == "ok":
            guarded(c, "gpu_tests", gpu_tests)
            if not args.skip_runs:
                guarded(c, "runs", objective_runs, (args.runs or ("parallel" if c.gpu else "sequential")) == "parallel")
            guarded(c, "benches", gpu_benches)
    finally:
        ok = c.finish()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
