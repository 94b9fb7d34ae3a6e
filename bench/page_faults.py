"""What the first touch of fresh memory costs on this machine, by how deep into its free memory it reaches.

    .venv/bin/python -m bench --only page_faults [--quick]

One byte is written to every 4 KiB page of fresh private anonymous memory (transparent huge pages off for
it, so a fault is one page), 512 MiB at a time, and every chunk is kept, so each chunk takes pages the
kernel had not handed out yet. Full mode touches up to 16 GiB, never more than MemFree less 4 GiB (no page
cache is reclaimed for it); --quick one GiB (a check that it runs). All of it is unmapped at the end.

On bare metal, or a VM whose memory the host keeps backed, every chunk should cost the same. On this CI
machine (a Firecracker VM with free page reporting) it does not: 2026-12-07 the first 7-10 GiB took 1.3-1.7
us a fault and most chunks past them 11-13 us, most likely faults the host takes too, on pages it backs on
demand (docs/performance.md: "This machine"). A CPU trainer takes 0.4-1.3 M first touches a step (its
activations), so which pages it gets moves a step by seconds (the self_play_real section).
"""

from __future__ import annotations

import mmap
import resource
import time

import numpy as np

from bench.common import Context, Skip, compare, median, meminfo

CHUNK = 2**29  # 512 MiB
GIB = 2**30
PAGE = 4096
SIZES = {"quick": dict(gib=1.0, reserve_gib=1.0), "full": dict(gib=16.0, reserve_gib=4.0)}
SLOW = 3.0  # times the first chunk's cost a fault: a chunk of dear pages


def touch_chunk() -> tuple[mmap.mmap, float, int]:
    """A fresh 512 MiB mapping with every page written once: (the mapping, its seconds, its minor faults)."""
    chunk = mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # as malloc maps: not shmem
    chunk.madvise(mmap.MADV_NOHUGEPAGE)  # where THP is "always" a fault would map 2 MiB
    before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    np.frombuffer(chunk, dtype=np.uint8)[::PAGE] = 1
    seconds = time.perf_counter() - t0
    return chunk, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def spans(starts: list[float], step: float) -> str:
    """Adjacent chunks as ranges: [0.5, 1.0, 2.0] with step 0.5 -> '0.5-1.5, 2.0-2.5'."""
    out: list[list[float]] = []
    for a in starts:
        if out and abs(out[-1][1] - a) < 1e-9:
            out[-1][1] = a + step
        else:
            out.append([a, a + step])
    return ", ".join(f"{a:.1f}-{b:.1f}" for a, b in out)


def run(ctx: Context) -> dict:
    s = ctx.sizes(SIZES)
    free = meminfo()["MemFree"]
    n = int(min(s["gib"] * GIB, free - s["reserve_gib"] * GIB) // CHUNK)
    if n < 2:
        raise Skip(f"{free / GIB:.1f} GiB free: too little to compare two 512 MiB chunks")
    kept, rows = [], []  # rows: GiB touched before the chunk, us a fault, faults, GiB free and page cache after
    try:
        for i in range(n):
            chunk, seconds, faults = touch_chunk()
            kept.append(chunk)
            mem = meminfo()
            rows.append((i * CHUNK / GIB, seconds * 1e6 / max(faults, 1), faults, mem["MemFree"] / GIB,
                         mem["Cached"] / GIB))
    finally:
        for chunk in kept:
            chunk.close()
    first = rows[0][1]
    slow = [r for r in rows if r[1] > SLOW * first]
    where = spans([r[0] for r in slow], CHUNK / GIB)
    return {
        "comparisons": [compare("microseconds per first-touch fault", "us", "the first 512 MiB", first,
                                f"the chunks over {SLOW:g}x slower ({len(slow) * CHUNK / GIB:.1f} GiB), median"
                                if slow else "every chunk, median", median(r[1] for r in (slow or rows)),
                                higher_is_better=False, slow_gib=len(slow) * CHUNK / GIB)],
        "tables": [{"title": "Each 512 MiB chunk, kept as the next one is touched",
                    "columns": ["GiB touched before it", "us per fault", "faults", "GiB free after",
                                "GiB page cache after"],
                    "rows": [[round(at, 1), round(us, 2), faults, round(fr, 1), round(cache, 1)]
                             for at, us, faults, fr, cache in rows]}],
        "notes": [f"The first chunk: {first:.2f} us a fault. "
                  + (f"{len(slow)} of {n} chunks cost more than {SLOW:g}x that (GiB touched before them: {where})."
                     if slow else f"No chunk cost more than {SLOW:g}x that. (Were the first chunk dear too, "
                                  "this could not tell: compare its cost with a machine where memory is backed.)")],
        "config": s,
        "details": {"slow_chunks_from_gib": [r[0] for r in slow]},
    }
