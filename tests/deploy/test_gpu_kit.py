"""The GPU kit (bench/gpu_kit): the repacked wheel installs, failures read in one line, and (slow) the whole
kit installs offline into a clean venv standing in for the GPU image and its CPU part passes.

    .venv/bin/pytest -q tests/deploy/test_gpu_kit.py
    .venv/bin/pytest -q -m slow tests/deploy/test_gpu_kit.py      (stand-in venv + kit + run.sh: ~10 min)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from bench.gpu_kit.check import RUNS, bench_status
from bench.gpu_kit.repack import main as repack_main
from tests.helpers import REPO

KIT = REPO / "bench" / "gpu_kit"


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel of distribution `demo` 1.0 holding `files` (RECORD with real hashes)."""
    info = "demo-1.0.dist-info"
    files = {**files, f"{info}/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
              for n, d in files.items()] + [f"{info}/RECORD,,"]
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def test_repack_leaves_out_the_prefixes_and_pip_installs_the_rest(tmp_path, capsys):
    files = {"demo/__init__.py": b"VALUE = 7\n", "demo/jars/big.jar": b"J" * 50_000,
             "demo/core/tool.bin": os.urandom(2048),
             # a vendored package's own dist-info (ray has 12): not the wheel's RECORD
             "demo/_vendor/dep-2.0.dist-info/RECORD": b"dep/x.py,,\n"}
    src = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", files)
    assert repack_main([str(src), str(tmp_path / "out"), "--drop", "demo/jars/"]) == 0
    assert "demo-1.0-py3-none-any.whl: " in capsys.readouterr().out
    dst = tmp_path / "out" / src.name
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        record = z.read("demo-1.0.dist-info/RECORD").decode().splitlines()
    assert "demo/jars/big.jar" not in names and "demo/core/tool.bin" in names
    assert not any(line.startswith("demo/jars/") for line in record)
    digest = base64.urlsafe_b64encode(hashlib.sha256(files["demo/core/tool.bin"]).digest()).rstrip(b"=").decode()
    assert f"demo/core/tool.bin,sha256={digest},2048" in record

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    str(dst)], check=True)
    assert (target / "demo" / "core" / "tool.bin").read_bytes() == files["demo/core/tool.bin"]
    assert not (target / "demo" / "jars").exists()
    out = subprocess.run([sys.executable, "-c", "import demo; print(demo.VALUE)"], env={**os.environ,
                         "PYTHONPATH": str(target)}, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "7"


def test_repack_refuses_a_zip_that_is_not_a_wheel_in_one_line(tmp_path, capsys):
    bad = tmp_path / "notawheel-1.0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("x.py", "")
    assert repack_main([str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"repack: {bad}: not a wheel (expected one .dist-info/RECORD, found 0)"


def test_run_sh_without_a_kit_says_what_to_run(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(["bash", str(KIT / "run.sh"), str(tmp_path / "out")], capture_output=True, text=True,
                          env={**os.environ, "KIT": str(tmp_path / "empty")})
    assert proc.returncode == 2
    assert proc.stdout.strip() == (f"run.sh: no wheels in {tmp_path / 'empty'} "
                                   "(run bash bench/gpu_kit/prepare.sh here first)")


def test_check_fails_in_one_line_when_ray_is_not_the_kits(tmp_path):
    """ray and deepspeed imported from anywhere but the kit's folder: the check stops at its first step."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_kit.check", str(out), "--skip-runs"], cwd=REPO,
                          env={**os.environ, "KIT_SITE": str(tmp_path / "kit-site")}, capture_output=True, text=True)
    assert proc.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    [env] = summary["steps"]
    assert env["name"] == "environment" and env["status"] == "fail" and summary["ok"] is False
    assert env["line"] == f"not from the kit ({tmp_path / 'kit-site'}): ray, deepspeed"
    assert sorted(p.name for p in out.iterdir()) == ["check.log", "details.tar.gz", "summary.json"]


def test_bench_status_tells_a_cap_from_a_crash_from_a_missing_package():
    vllm_missing = {"name": "batch 32", "skipped": "vllm is not installed (pip install -e .[cpu] or .[gpu])"}
    raised = {"name": "DeepSpeed ZeRO-3, Ray actor", "skipped": "RuntimeError: CUDA error: out of memory"}
    assert bench_status({"comparisons": [vllm_missing]}) == "ok"
    assert bench_status({"comparisons": [vllm_missing, raised]}) == "fail"
    assert bench_status({"skipped": "timed out after 90 s (see the log)"}) == "cut"
    assert bench_status({"skipped": "failed: ImportError: no module named vllm"}) == "fail"
    assert bench_status({"skipped": "child exited with -9 and no result: Killed"}) == "fail"
    assert bench_status({"skipped": "needs 2 GPUs"}) == "skip"


@pytest.mark.slow
def test_kit_installs_offline_into_a_clean_venv_and_its_cpu_part_passes(tmp_path):
    """The GPU image's stand-in (torch + transformers + image.txt, no ray/deepspeed/pydantic): the kit for this
    Python installs with --no-index, every gpu test skips, each objective's whole run passes on CPU through
    the kit's ray (one head, four jobs) and DeepSpeed ZeRO-3, and the GPU benches skip with their line."""
    venv, kit, out = tmp_path / "standin", tmp_path / "kit", tmp_path / "out"
    subprocess.run(["bash", str(KIT / "standin.sh"), str(venv)], check=True)
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run(["bash", str(KIT / "prepare.sh"), "--python", pyver, "--dest", str(kit)], check=True)
    env = {**os.environ, "KIT": str(kit), "PYTHON": str(venv / "bin" / "python"), "PIP_NO_INDEX": "1",
           "KIT_SITE": str(tmp_path / "site")}
    env.pop("PYTHONPATH", None)
    # --runs parallel: the four runs as jobs of one `ray start --head`, as on a GPU (CPU default: one by one)
    proc = subprocess.run(["bash", str(KIT / "run.sh"), str(out), "--runs", "parallel"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert summary["ok"] and summary["gpu"] is False
    assert list(steps) == ["environment", "gpu_tests", *[f"run_{o}" for o in RUNS],
                           "bench_trainer", "bench_logprob_memory", "bench_trainer_memory", "bench_generation",
                           "bench_weight_sync"]
    assert steps["environment"]["status"] == "ok" and "no CUDA (CPU stand-in)" in steps["environment"]["line"]
    assert steps["environment"]["details"]["ray"] == "2.60.0"
    assert steps["gpu_tests"]["status"] == "skip" and steps["gpu_tests"]["line"].endswith(
        "(no CUDA: every gpu test skips)")
    for objective, family in RUNS.items():
        run = steps[f"run_{objective}"]
        assert run["status"] == "ok", run["line"]
        assert run["details"]["family"] == family and run["details"]["iterations"] == 2
    for name in ("trainer", "logprob_memory", "trainer_memory", "generation", "weight_sync"):
        assert steps[f"bench_{name}"]["status"] == "skip" and "no CUDA" in steps[f"bench_{name}"]["line"]
    assert {p.name for p in out.iterdir() if p.is_file()} == {"summary.json", "check.log", "details.tar.gz"}
    with tarfile.open(out / "details.tar.gz") as tar:
        names = tar.getnames()
    assert all(f"details/runs/{o}/metrics.jsonl" in names for o in RUNS)
    assert not any("checkpoints" in n or n.endswith(".safetensors") for n in names)  # random weights stay out
    assert (out / "details.tar.gz").stat().st_size < 16 * 2**20  # one file a device call returns
