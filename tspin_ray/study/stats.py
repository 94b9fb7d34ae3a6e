"""Per-seed statistics of a study: mean ± std, paired differences, verdicts and their formatting.

    .venv/bin/pytest tests/unit/study/test_study.py
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from tspin_ray.analysis.report import load_run


def iteration_rows(root: Path) -> dict[int, dict]:
    """iteration -> its metrics row (a resumed run may log one twice: the last wins, as in analysis/report.py);
    {} for a run not started yet (results of a study still running, or narrowed by --methods)."""
    if not (Path(root) / "metrics.jsonl").exists():
        return {}
    return load_run(root).iterations


def number(v) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def stats(values: Sequence[float | None]) -> dict:
    """Mean and sample std (n-1) over seeds; std is None with fewer than two values. `values` keeps the
    per-seed numbers in seed order (None where a run is missing) for paired differences."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": mean, "std": std, "n": len(vals), "values": list(values)}


def paired(a: dict, b: dict) -> dict:
    """Stats of the per-seed differences a - b. Every method of a seed starts from the same pi_0, so the
    seed-to-seed spread of pi_0 (large at this scale) cancels seed by seed instead of blurring every
    comparison.

    >>> paired(stats([0.2, 0.5, 0.4]), stats([0.1, 0.4, 0.35]))["mean"]   # 0.1, 0.1, 0.05
    0.08333333333333333
    """
    return stats([x - y for x, y in zip(a["values"], b["values"], strict=True) if x is not None and y is not None])


# ------------------------------------------------------------ claim checks
def verdict(diff: float, spread: float | None) -> str:
    """'holds' when the mean per-seed difference is > 0 by more than the std of those differences, 'does
    not hold' when < 0 by more, else inconclusive (also with one seed: no spread to judge it by)."""
    if spread is None or abs(diff) <= spread:
        return "inconclusive"
    return "holds" if diff > 0 else "does not hold"


def fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def mean_std(st: dict, digits: int = 3) -> str:
    if st["mean"] is None:
        return "–"
    return fmt(st["mean"], digits) + ("" if st["std"] is None else f" ± {st['std']:.{digits}f}")


def plus_minus(d: dict) -> str:
    """A paired difference: +mean ± std (n seeds)."""
    return f"{d['mean']:+.3f}" + ("" if d["std"] is None else f" ± {d['std']:.3f}") + f" (n={d['n']})"
