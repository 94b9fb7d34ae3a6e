"""What the first touch of fresh memory costs on this machine, by how deep into its free memory it reaches.

    .venv/bin/python -m bench --only page_faults [--quick]

One byte is written to every 4 KiB page of fresh anonymous memory, 512 MiB at a time, and every chunk is
kept, so each chunk takes pages the machine had not handed out yet: the first chunks the ones freed last,
the later ones pages that have been free for longer. Full mode touches up to 16 GiB, never more than
MemAvailable less 4 GiB; --quick one GiB (a check that it runs). All of it is unmapped at the end.

On bare metal, or a VM whose memory the host keeps backed, every chunk costs the same. On a VM whose host
backs guest memory on demand and takes free pages back (this CI machine: Firecracker with free page
reporting), a fault on a page the host no longer backs is also a fault in the host: 2026-12-07 here the
first 10 GiB took 1.3-1.5 us a fault and the chunks past them 11-13 us (how much is fast varies with what
was freed lately: 7.5-10 GiB in four runs). A CPU trainer takes 0.4-1 M first touches a step (its
activations), so which pages it gets moves a step by seconds: docs/performance.md (self_play_real).
"""

from __future__ import annotations

import mmap
import resource
import time

import numpy as np

from bench.common import Context, compare, median

CHUNK = 2**29  # 512 MiB
PAGE = 4096
SIZES = {"quick": dict(gib=1.0, reserve_gib=1.0), "full": dict(gib=16.0, reserve_gib=4.0)}
SLOW = 3.0  # a chunk this many times slower than the first is past the memory the host still backs


def meminfo(key: str) -> int:
    """Bytes of /proc/meminfo's `key` (MemAvailable, MemFree, Cached)."""
    for line in open("/proc/meminfo"):
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/meminfo has no {key}")


def touch_chunk() -> tuple[mmap.mmap, float, int]:
    """A fresh 512 MiB mapping with every page written once: (the mapping, its seconds, its minor faults)."""
    before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    chunk = mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # as malloc maps: not shmem
    np.frombuffer(chunk, dtype=np.uint8)[::PAGE] = 1
    seconds = time.perf_counter() - t0
    return chunk, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def run(ctx: Context) -> dict:
    s = ctx.sizes(SIZES)
    budget = min(s["gib"] * 2**30, meminfo("MemAvailable") - s["reserve_gib"] * 2**30)
    n = int(budget // CHUNK)
    if n < 2:
        raise RuntimeError(f"only {meminfo('MemAvailable') / 2**30:.1f} GiB available: too little to compare two chunks")
    kept, rows = [], []
    try:
        for i in range(n):
            chunk, seconds, faults = touch_chunk()
            kept.append(chunk)
            rows.append([(i + 1) * CHUNK / 2**30, seconds * 1e6 / max(faults, 1), faults,
                         meminfo("MemFree") / 2**30, meminfo("Cached") / 2**30])
    finally:
        for chunk in kept:
            chunk.close()
    first = rows[0][1]
    slow = [r for r in rows if r[1] > SLOW * first]
    gib = CHUNK / 2**30
    where = ", ".join(f"{r[0] - gib:.1f}-{r[0]:.1f}" for r in slow)
    return {
        "comparisons": [compare("microseconds per first-touch fault", "us", "the first 512 MiB", first,
                                f"the chunks over {SLOW:g}x slower ({len(slow) * gib:.1f} GiB), median" if slow
                                else "every chunk, median", median(r[1] for r in (slow or rows)),
                                higher_is_better=False, slow_gib=len(slow) * gib)],
        "tables": [{"title": "Each 512 MiB chunk, kept as the next one is touched",
                    "columns": ["GiB touched", "us per fault", "faults", "GiB free after", "GiB page cache after"],
                    "rows": [[round(a, 1), round(b, 2), c, round(d, 1), round(e, 1)] for a, b, c, d, e in rows]}],
        "notes": [f"{len(slow)} of {n} chunks cost more than {SLOW:g}x the first one's (GiB touched: {where})."
                  if slow else f"No chunk cost more than {SLOW:g}x the first one's: fresh memory costs the same throughout."],
        "config": s,
        "details": {"slow_chunks_gib": [r[0] for r in slow]},
    }
