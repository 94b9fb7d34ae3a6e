"""`ray job submit` against a real Ray head on loopback: jobs/submit.sh, the driver connecting to the
cluster, the uploaded working directory, and a job stopped after its first iteration and resubmitted.

    .venv/bin/pytest tests/e2e/test_job_submit.py

The head is started by `ray start --head --block` in its own temp dir (RAY_TMPDIR too, so its address
file never makes another process's plain `ray.init()` connect to it), on free ports, with token auth and
a token of its own (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN: what KubeRay injects; a plain `ray start` in
Ray 2.60 turns token auth on by itself only when it finds a token, e.g. ~/.ray/auth_token). Every process of that cluster, job drivers included, inherits a marker
variable; teardown stops the head and then ends exactly the processes carrying the marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.procs import MARK, die_with_parent, end_marked, free_port, marked_pids  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SUBMIT = REPO / "jobs" / "submit.sh"
CONFIG = "jobs/tiny-cpu.yaml"
# jobs/tiny-cpu.yaml made smaller for the tests: 100 training rows and no evaluation. The job's cost is
# mostly fixed (the driver's start, and one generator actor start plus model load per generation phase;
# each evaluation is a phase of its own), and evaluation is covered by tests/e2e/test_driver.py.
SHRINK = ["data.task_size=100", "data.eval_size=0"]
# The stop/resume test keeps a small evaluation: the evaluation of pi_1 is what runs between pi_1's commit
# and iteration 0's (iter_0), the window that a stop right after pi_1 most likely hits.
SHRINK_STOP = ["data.task_size=100", "data.eval_size=8"]
class Head:
    """A `ray start --head` cluster on loopback, and the environment that talks to its job server."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="tsj-", dir="/tmp"))  # short: socket paths have a limit
        self.mark = uuid.uuid4().hex
        self.token = secrets.token_hex(32)
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        base.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # an activated venv
                    RAY_TMPDIR=str(self.tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                    HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM the head stops at once instead of draining
        # for up to 30 s.
        self.cluster_env = {**base, MARK: self.mark, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.client_env = {**base, "RAY_ADDRESS": self.address}
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(free_port()), "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
               "--ray-client-server-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()),
               "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
               "--num-cpus", "8", "--temp-dir", str(self.tmp / "ray"), "--disable-usage-stats"]
        self.cmd = cmd
        self.proc = None

    def start(self) -> None:
        self.log = open(self.tmp / "ray-start.log", "wb")
        self.proc = subprocess.Popen(self.cmd, env=self.cluster_env, cwd=self.tmp, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=die_with_parent)

    def wait_ready(self) -> None:
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self.start_log()}")
            if self.ray("job", "list", check=False, timeout=30).returncode == 0:
                break
            if time.time() > deadline:
                raise RuntimeError(f"job server not up after 120 s: {self.start_log()}")
            time.sleep(1)

    def start_log(self) -> str:
        return (self.tmp / "ray-start.log").read_text(errors="replace")[-3000:]

    def ray(self, *args, check=True, timeout=120, env=None) -> subprocess.CompletedProcess:
        p = subprocess.run([str(BIN / "ray"), *args], env=env or self.client_env, cwd=REPO, timeout=timeout,
                           capture_output=True, text=True)
        if check and p.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} -> {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        return p

    def submit(self, *args, timeout=300) -> tuple[str, subprocess.CompletedProcess]:
        p = subprocess.run(["bash", str(SUBMIT), *args], env=self.client_env, cwd=REPO, timeout=timeout,
                           capture_output=True, text=True)
        m = re.search(r"^submission id: (\S+)$", p.stdout, re.M)
        assert m, f"no submission id printed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return m.group(1), p

    def info(self, job_id: str) -> dict:
        """The job's details from the job server's REST API (what `ray job status` asks, minus a CLI start)."""
        req = urllib.request.Request(f"{self.address}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def status(self, job_id: str) -> str:
        return self.info(job_id)["status"]

    def logs(self, job_id: str) -> str:
        return self.ray("job", "logs", job_id).stdout

    def working_dirs(self) -> list[Path]:
        """The unpacked working-directory packages on this (single) node."""
        return sorted(p for p in (self.tmp / "ray").glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
                      if p.is_dir())

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # ray start --block: stops its node's processes
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            end_marked(self.mark)  # job drivers run in sessions of their own; anything left over
            if self.proc is not None:
                self.log.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    h = Head()
    try:
        h.start()
        h.wait_ready()
        yield h
    finally:
        h.close()


def sha256_files(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["entries"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_cpu_config_is_the_test_suites_small_config(tmp_path):
    from tests.helpers import small_config
    from tspin_ray.config.schema import from_dict, load_config

    assert load_config(REPO / CONFIG).hash() == from_dict(small_config(tmp_path)).hash()


def test_submit_script_quotes_overrides_and_resolves_the_config():
    out = subprocess.run(["bash", str(SUBMIT), str(REPO / CONFIG), "output_dir=/mnt/runs/x",
                          "objective.overrides={-1: {beta: 5.0}}", "--no-wait", "--submission-id", "sid-1",
                          "--dry-run"], cwd="/", capture_output=True, text=True, check=True,
                         env={**os.environ, "RAY_AUTH_TOKEN": "t"}).stdout
    assert out.splitlines()[0] == "submission id: sid-1"
    cmd = shlex.split(out.splitlines()[1])
    assert cmd[cmd.index("--working-dir") + 1] == str(REPO)
    assert "--no-wait" in cmd and cmd[cmd.index("--submission-id") + 1] == "sid-1"
    assert json.loads(cmd[cmd.index("--runtime-env-json") + 1])["excludes"]
    # Separate words after `--`: Ray's CLI quotes each one (shlex.join) for the job server's /bin/sh.
    argv = cmd[cmd.index("--") + 1:]
    assert argv == ["python", "-m", "tspin_ray", "train", "--config", CONFIG, "output_dir=/mnt/runs/x",
                    "objective.overrides={-1: {beta: 5.0}}"]


def test_job_runs_on_the_cluster_and_writes_a_complete_run(head, tmp_path):
    run = tmp_path / "run"
    job, p = head.submit(CONFIG, f"output_dir={run}", "iterations=1", *SHRINK)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert head.status(job) == "SUCCEEDED"
    logs = head.logs(job)
    # The driver joined this cluster (RAY_ADDRESS from the job server) instead of starting a Ray of its
    # own: the job server only learns a driver's node and pid when that driver connects to its GCS.
    driver = head.info(job)["driver_info"]
    assert driver and driver.get("pid"), head.info(job)
    assert "Started a local Ray instance" not in logs, logs
    assert f"done: {run}" in logs
    entries = manifest(run)
    assert {"pi_0", "eval_0", "gen_0", "pi_1", "iter_0", "complete"} <= set(entries)
    from tspin_ray.rundir.store import verify_dir

    for t in (0, 1):
        assert (run / "checkpoints" / f"pi_{t}" / "model.safetensors").is_file()
        assert verify_dir(run / entries[f"pi_{t}"]["path"], entries[f"pi_{t}"]["files"]) is None
    rows = metrics(run)
    assert [r["iteration"] for r in rows if r["phase"] == "iteration"] == [-1, 0]
    assert any(r["phase"] == "sft" for r in rows) and any(r["phase"] == "train" for r in rows)
    # What was uploaded: the source and the configs, not the virtualenv, the runs or the git history.
    pkgs = head.working_dirs()
    assert pkgs, "no unpacked working_dir package found"
    pkg = pkgs[-1]
    assert (pkg / "tspin_ray" / "controller" / "driver.py").is_file() and (pkg / CONFIG).is_file()
    for name in (".venv", ".git", "runs", "tspin_ray.egg-info"):
        assert not (pkg / name).exists(), f"{name} was uploaded"
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"working_dir package is {size / 2**20:.1f} MiB"


def test_job_server_refuses_a_client_without_the_token(head, tmp_path):
    wrong = {**head.client_env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    p = head.ray("job", "list", check=False, timeout=60, env=wrong)
    said = (p.stdout + p.stderr).lower()
    assert p.returncode != 0 and ("401" in said or "unauthorized" in said or "authentication" in said), said
    bare = {k: v for k, v in head.client_env.items() if not k.startswith("RAY_AUTH")}
    bare["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    assert head.ray("job", "list", check=False, timeout=60, env=bare).returncode != 0


def test_shipped_source_shadows_the_installed_package(head):
    """The tspin_ray that a job imports is the uploaded checkout (front of PYTHONPATH), not site-packages."""
    job = f"where-{uuid.uuid4().hex[:8]}"
    head.ray("job", "submit", "--address", head.address, "--working-dir", str(REPO), "--submission-id", job,
             "--", "python", "-c", "import tspin_ray; print('TSPIN_RAY_FROM', tspin_ray.__file__)", timeout=90)
    m = re.search(r"TSPIN_RAY_FROM (\S+)", head.logs(job))
    assert m and "/runtime_resources/working_dir_files/_ray_pkg_" in m.group(1), head.logs(job)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def committed(run: Path, name: str) -> bool:
    try:
        return name in manifest(run)
    except (OSError, ValueError):  # not there yet (it is replaced atomically, never half-written)
        return False


@pytest.mark.chaos
@pytest.mark.slow  # 140 s here; resume after a kill is in the default suite through tests/e2e/test_chaos.py
def test_stopped_job_resumes_from_its_committed_work(head, tmp_path):
    run = tmp_path / "run"
    args = [CONFIG, f"output_dir={run}", "iterations=2", *SHRINK_STOP]
    job, p = head.submit(*args, "--no-wait", timeout=60)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    def pi_1_or_job_over():
        if committed(run, "pi_1"):
            return True
        status = head.status(job)
        assert status in ("PENDING", "RUNNING"), f"job ended {status} before pi_1:\n{head.logs(job)[-4000:]}"
        return False

    wait_for(pi_1_or_job_over, 240, "pi_1 to be committed", poll=0.25)
    head.ray("job", "stop", job, timeout=60)
    assert head.status(job) == "STOPPED"
    entries = manifest(run)  # valid JSON: the manifest is replaced atomically
    assert "pi_1" in entries and "complete" not in entries
    from tspin_ray.rundir.store import verify_dir

    assert verify_dir(run / entries["pi_1"]["path"], entries["pi_1"]["files"]) is None
    pi_1 = sha256_files(run / "checkpoints" / "pi_1")
    stopped_during = sorted(entries)

    job2, p = head.submit(*args)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert head.status(job2) == "SUCCEEDED"
    entries = manifest(run)
    assert {"pi_0", "pi_1", "pi_2", "iter_1", "complete"} <= set(entries)
    assert sha256_files(run / "checkpoints" / "pi_1") == pi_1  # committed work is reused, not redone
    rows = metrics(run)
    sft_steps = [r["step"] for r in rows if r["phase"] == "sft"]
    assert sft_steps and len(sft_steps) == len(set(sft_steps)), "the SFT stage ran again"
    assert "[sft]" not in head.logs(job2)
    train_1 = [r["step"] for r in rows if r["phase"] == "train" and r["iteration"] == 1]
    assert train_1 and len(train_1) == len(set(train_1))
    iterations = [r["iteration"] for r in rows if r["phase"] == "iteration"]
    if "iter_0" not in entries:
        # Known driver gap: the stop came after pi_1 was committed but before iteration 0 was (iter_0: its
        # evaluation and summary), and Driver.run_all resumes at the latest committed checkpoint, so
        # iteration 0's summary and train rows (pruned as uncommitted) never come back. Once run_all redoes
        # an iteration whose iter_t is missing, this branch is never taken and the assert below applies.
        pytest.xfail(f"resume gap: stopped with {stopped_during}; iteration rows {iterations}")
    assert iterations == [-1, 0, 1]
