"""Which accelerator this process uses: the one Ray assigned to the actor, by its index among the visible ones;
how a trainer's process treats memory and floats on CPU.

    .venv/bin/pytest tests/unit/workers/test_devices.py

Ray narrows CUDA_VISIBLE_DEVICES to an actor's GPUs, so the assigned one is usually index 0; with
RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 (set by clusters that share GPUs between processes) every id
stays visible and index 0 would put each rank of a node on the same GPU, which NCCL refuses. The trainer's
LOCAL_RANK and `torch.cuda.set_device` follow the index found here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ray
import torch


def visible_index(assigned: Sequence[str], visible: str | None) -> int:
    """Index among this process's visible devices of the first one Ray assigned (0 without an assignment).

    >>> visible_index(["3"], "3"), visible_index(["3"], "0,1,2,3"), visible_index(["2"], None)
    (0, 3, 2)
    """
    if not assigned:
        return 0
    if not visible:  # every device visible, in the order of their ids
        return int(assigned[0])
    ids = [v.strip() for v in visible.split(",")]
    if str(assigned[0]) not in ids:
        raise RuntimeError(f"Ray assigned GPU {assigned[0]} but CUDA_VISIBLE_DEVICES is {visible!r}: this process "
                           f"cannot see its own device")
    return ids.index(str(assigned[0]))


def flush_denormals() -> None:
    """On CPU, compute with subnormal floats (below 1.2e-38) as zero: x86's FTZ/DAZ, as TensorFlow's and
    XLA's CPU runtimes do. Every float operation on a subnormal takes a slow path, and transient ones
    appear as a model's output distribution sharpens: SmolLM2's epochs on its own samples took twice as
    long from the third iteration's on (`python -m bench --only denormals`). The flag is per thread and
    OpenMP's threads copy it when they start, so this runs before the process's first parallel op."""
    if not torch.cuda.is_available():
        torch.set_flush_denormal(True)


def local_device() -> torch.device:
    """This actor's device (made current), or the CPU without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    assigned = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    index = visible_index(assigned, os.environ.get("CUDA_VISIBLE_DEVICES"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


# CPU trainers keep the memory they free: with glibc's defaults each step unmaps and re-faults GBs of
# activations, at 10 us a page on VMs that back memory lazily (bench page_faults). Never trimmed, the heap makes
# SmolLM2's iterations 7% faster; the trainer stays at its peak memory (docs/performance.md, self_play_real).
# Only the main thread's heap obeys; the trainer steps on it.
CPU_TRAINER_HEAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30), "MALLOC_TOP_PAD_": str(2**28)}


def trainer_env(gpus: float) -> dict[str, str]:
    """Environment variables of the trainer actors' own processes: CPU_TRAINER_HEAP for CPU trainers, unless
    the user set any of those variables (then theirs, all of them, as given)."""
    if gpus or any(k in os.environ for k in CPU_TRAINER_HEAP):
        return {}
    return dict(CPU_TRAINER_HEAP)
