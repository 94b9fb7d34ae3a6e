"""Progress and the per-iteration table: tqdm bars on a terminal, one line per phase otherwise.

    tspin-ray train --config jobs/demo-cpu.yaml          (bars)
    tspin-ray train --config jobs/demo-cpu.yaml --quiet  (table only)
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

from tqdm import tqdm

# Columns of the per-iteration table: (header, metrics key, format).
TABLE = [
    ("iter", "iteration", "{:>4}"),
    ("loss", "train/loss", "{:>8.4f}"),
    ("adv/cur", "train/advantage/current", "{:>8.3f}"),
    ("adv/hist", "train/advantage/historical", "{:>8.3f}"),
    ("margin", "train/rewards/margins", "{:>8.3f}"),
    ("eval EM", "eval/exact_match", "{:>8.3f}"),
    ("eval NLL", "eval/nll", "{:>8.4f}"),
    ("gen s", "timing/generate", "{:>7.1f}"),
    ("train s", "timing/train", "{:>7.1f}"),
    ("sync s", "timing/weight_sync", "{:>6.2f}"),
    ("eval s", "timing/eval", "{:>6.1f}"),
    ("total s", "timing/iteration", "{:>7.1f}"),
]


class _Bar:
    def __init__(self, bar: tqdm | None):
        self.bar, self.n, self.peak_pool = bar, 0, None

    def pool(self, size: int | None) -> None:
        """Show the live generator pool size next to the bar."""
        if size is None:
            return
        self.peak_pool = max(size, self.peak_pool or 0)
        if self.bar is not None:
            self.bar.set_postfix(generators=size, refresh=False)

    def update(self, n: int) -> None:
        """Advance by n (generation rows) — or, for a training phase, set the absolute step count."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def set(self, n: int) -> None:
        self.update(n - self.n)


class Progress:
    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.interactive = not quiet and self.stream.isatty()
        self.header_done = False

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    @contextlib.contextmanager
    def phase(self, name: str, total: int | None = None):
        t0 = time.time()
        bar = tqdm(total=total, desc=name, file=self.stream, leave=False, dynamic_ncols=True) \
            if self.interactive else None
        handle = _Bar(bar)
        try:
            yield handle
        finally:
            if bar is not None:
                bar.close()
            if not self.quiet:
                pool = f" (generators: up to {handle.peak_pool})" if handle.peak_pool else ""
                print(f"[{name}] {handle.n}{'/' + str(total) if total else ''} in {time.time() - t0:.1f}s{pool}",
                      file=self.stream, flush=True)

    def metrics(self, rows: list[dict]) -> None:
        for row in rows:
            if row.get("phase") != "iteration":
                continue
            if not self.header_done:
                print(" ".join(f"{h:>{_width(f)}}" for h, _, f in TABLE), flush=True)
                self.header_done = True
            cells = []
            for _, key, fmt in TABLE:
                v = row.get(key)
                if key == "iteration":
                    v = "pi0" if v == -1 else v
                    cells.append(f"{v!s:>4}")
                elif v is None or (isinstance(v, float) and math.isnan(v)):
                    cells.append(" " * (_width(fmt) - 1) + "-")
                else:
                    cells.append(fmt.format(v))
            print(" ".join(cells), flush=True)


def _width(fmt: str) -> int:
    return int(fmt.split(">")[1].split(".")[0].rstrip("}"))
