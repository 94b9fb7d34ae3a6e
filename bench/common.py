"""Shared pieces of the benchmarks: sizes per mode, comparisons, timing, tiny checkpoints, prompts, Ray.

    .venv/bin/python -m bench --quick      (every benchmark module builds on these)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Skip(Exception):
    """A benchmark that cannot run here (a missing package, no GPU): recorded as {"skipped": reason}."""


@dataclasses.dataclass
class Context:
    quick: bool
    work: Path  # a scratch directory of this benchmark's child process, removed afterwards
    repeats: int | None = None  # --repeats: overrides the sizes' `repeats` where a benchmark has one

    @property
    def gpu(self) -> bool:
        import torch

        return torch.cuda.is_available()

    def sizes(self, table: dict) -> dict:
        """The quick sizes, or the full ones for this machine (GPU sizes when CUDA is available), with --repeats."""
        s = dict(table["quick"] if self.quick else table["gpu"] if self.gpu and "gpu" in table else table["full"])
        if self.repeats and "repeats" in s:
            s["repeats"] = self.repeats
        return s


# ------------------------------------------------------------ comparisons
def compare(name: str, metric: str, baseline: str, baseline_value: float, candidate: str, value: float,
            higher_is_better: bool | None = True, **extra) -> dict:
    """One figure and the baseline it is read against; ratio = candidate / baseline."""
    return {"name": name, "metric": metric, "baseline": baseline, "baseline_value": float(baseline_value),
            "candidate": candidate, "value": float(value), "ratio": float(value) / float(baseline_value),
            "higher_is_better": higher_is_better, **extra}


def skipped(name: str, metric: str, baseline: str, baseline_value: float | None, candidate: str,
            reason: str) -> dict:
    """A comparison whose candidate could not be measured here (the baseline may still be)."""
    return {"name": name, "metric": metric, "baseline": baseline,
            "baseline_value": None if baseline_value is None else float(baseline_value),
            "candidate": candidate, "skipped": reason}


# ------------------------------------------------------------ timing
def now() -> float:
    return time.perf_counter()


def sync() -> None:
    """Wait for queued GPU work, so a timer read after it covers the work (no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    sync()
    t0 = now()
    out = fn(*args, **kwargs)
    sync()
    return out, now() - t0


def anon_mb() -> float:
    """Anonymous memory this process holds now (RssAnon): its own allocations, not page cache."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("RssAnon:")) / 1024


def meminfo() -> dict[str, int]:
    """/proc/meminfo's figures in bytes (MemFree, Cached, ...)."""
    with open("/proc/meminfo") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}


@contextlib.contextmanager
def memory_drawn(period_s: float = 0.1):
    """Yields a dict whose "bytes" is, on exit, the peak net fall of MemFree below its value at entry (sampled
    every period_s): fresh memory handed out meanwhile to every process and to the page cache, less what was
    freed in between. None where /proc/meminfo (or its MemFree) is missing."""
    out: dict = {"bytes": None}
    try:
        start = meminfo()["MemFree"]
    except (OSError, KeyError, ValueError):
        yield out
        return
    low, stop = [start], threading.Event()

    def watch():
        while not stop.wait(period_s):
            low[0] = min(low[0], meminfo()["MemFree"])

    thread = threading.Thread(target=watch, daemon=True, name="bench-memfree")
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["bytes"] = start - min(low[0], meminfo()["MemFree"])


def median(values) -> float:
    return float(statistics.median(values))


# ------------------------------------------------------------ models and prompts
# The GPU sizes' model: a real architecture at 0.52B (Qwen2: GQA, tied embeddings, byte-level BPE;
# tspin_ray/models/families.py), small enough for the GPU kit's 8 minutes (bench/gpu_kit), large enough that a
# step measures compute, not launches.
GPU_MODEL = dict(family="qwen2", hidden_size=1536, num_layers=20, num_heads=12, intermediate_size=4096,
                 max_position_embeddings=1024)

def tiny_spec(**overrides):
    from tspin_ray.config.schema import TinyModelSpec

    return TinyModelSpec(**overrides)


def make_checkpoint(path: Path, seed: int = 0, **spec) -> Path:
    """A random tiny Llama + character tokenizer (tspin_ray.models.tiny.save_tiny), once per path."""
    from tspin_ray.models.tiny import save_tiny

    if not (Path(path) / "config.json").exists():
        save_tiny(path, tiny_spec(seed=seed, **spec))
    return Path(path)


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def param_count(path: Path) -> int:
    """Parameters in a checkpoint's safetensors files (read from the headers, no weights loaded)."""
    from safetensors import safe_open

    n = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                n += int(math.prod(int(d) for d in shape))
    return n


def task_examples(n: int, seed: int = 0) -> list[dict]:
    """n distinct `addition` examples {id, prompt, response} (tspin_ray.data.tasks)."""
    from tspin_ray.data.tasks import TASKS

    return TASKS["addition"].make(n, seed)


def encoded_prompts(fmt, examples: list[dict]) -> list[list[int]]:
    """Rendered prompt ids under a checkpoint's ChatFormat (checkpoints.load_format)."""
    return [fmt.prompt_ids(e["prompt"]) for e in examples]


# ------------------------------------------------------------ Ray
def worker_env() -> dict:
    """tspin_ray's worker environment, plus the repo on PYTHONPATH so actors can unpickle bench code."""
    from tspin_ray.controller.trainer_group import WORKER_ENV

    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**WORKER_ENV, "PYTHONPATH": path}


def ray_cpus() -> int:
    """Logical CPUs of the benchmarks' local Ray: at least 8 (as the tests and ensure_ray do), so generators
    and trainers all get their bundles on a 2-core box and take turns on the cores."""
    return max(8, os.cpu_count() or 1)


@contextlib.contextmanager
def ray_session():
    """A local Ray for one benchmark, always shut down; yields the seconds ray.init took."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # a benchmark measures a local Ray, never a shared cluster
    t0 = now()
    ray.init(num_cpus=ray_cpus(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env()})
    try:
        data_context()
        yield now() - t0
    finally:
        ray.shutdown()


def data_context() -> None:
    """Ray Data settings exactly as tspin_ray.controller.trainer_group.ensure_ray makes them for a run."""
    from tspin_ray.config.schema import from_dict
    from tspin_ray.controller.trainer_group import ensure_ray

    ensure_ray(from_dict({"model": {"tiny": {}}, "data": {"task": "addition"},
                          "resources": {"trainer_cpus": 1, "generator_cpus": 1}}))


def actor_threads(num_cpus: float, num_gpus: float = 0) -> int:
    """torch intra-op threads inside a fresh actor with this many CPUs (Ray sets OMP_NUM_THREADS)."""
    import ray

    @ray.remote
    class Probe:
        def threads(self) -> int:
            import torch

            return torch.get_num_threads()

    probe = Probe.options(num_cpus=num_cpus, num_gpus=num_gpus or None).remote()
    try:
        return ray.get(probe.threads.remote(), timeout=120)
    finally:
        ray.kill(probe)


def free_gpu() -> None:
    """Hand cached GPU memory back, so the next engine or trainer in this process finds it free."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
