"""What the self-play health signals saw in a study: per method, which iterates looked collapsed, which
one each run named best, what best-iterate selection recovered, and whether y's likelihood fell.

    .venv/bin/pytest tests/unit/study/test_study.py -k health

The verdicts are the runs' own (controller/health.py `judge`, with each run's eval thresholds), read back
from metrics.jsonl and the manifests, so a study run before this section existed reports the same.
"""

from __future__ import annotations

from tspin_ray.analysis.run_reader import PI0
from tspin_ray.config.schema import load_config
from tspin_ray.controller.health import judge
from tspin_ray.rundir.store import RunDir
from tspin_ray.study.stats import fmt, iteration_rows, number, stats


def run_health(root, iterations: int) -> dict | None:
    """One run: collapsed iterates, the best one, EM and NLL at the last and the best, y's log-prob."""
    if not (root / "metrics.jsonl").exists():
        return None
    rows = iteration_rows(root)
    history = [(f"pi_{k}", rows[PI0 if k == 0 else k - 1]) for k in range(iterations + 1)
               if (PI0 if k == 0 else k - 1) in rows]
    if len(history) < iterations + 1:
        return None  # not finished (yet)
    e = load_config(root / "config.yaml").eval
    collapsed = [history[k][0] for k in range(1, len(history))
                 if judge(history[:k + 1], e).collapsed]
    best = (RunDir(root).entry("best") or {}).get("iterate", history[-1][0])
    at = dict(history)
    return {"collapsed": collapsed, "best": best,
            "em_last": number(history[-1][1].get("eval/exact_match")), "em_best": number(at[best].get("eval/exact_match")),
            "nll_last": number(history[-1][1].get("eval/nll")), "nll_best": number(at[best].get("eval/nll")),
            "logp_train": [number(r.get("health/logp_real_train")) for _, r in history]}


def summary(study) -> dict:
    """method -> seed -> run_health (None where the run is missing or unfinished)."""
    return {m: {s: run_health(study.out / f"seed{s}" / m, study.iterations) for s in study.seeds}
            for m in study.methods}


def lines(study, health: dict) -> list[str]:
    """The markdown section: one row per method, cells per seed where they differ by seed."""
    out = ["## Self-play health (controller/health.py's verdicts, each run's own thresholds)", "",
           "Collapsed: the iterates the run warned about (held-out NLL over eval.collapse_nll_factor x the best "
           "so far, or too few distinct greedy answers). Best: the iterate eval.select named (held-out NLL), per "
           "seed. EM and NLL: the last iterate → the best one (mean over seeds; selecting on held-out NLL and "
           "judging on it is optimistic). y's log-prob (training rows): pi_0 → the last iterate; a fall is "
           "likelihood displacement.", "",
           "| method | collapsed | best | EM last → best | NLL last → best | y's log-prob, train |",
           "|---|---|---|---|---|---|"]
    for m, per_seed in health.items():
        runs = [h for h in per_seed.values() if h is not None]
        if not runs:
            out.append(f"| {m} | – | – | – | – | – |")
            continue
        collapsed = "; ".join(f"s{s}: {', '.join(h['collapsed']) or 'none'}" for s, h in per_seed.items() if h)
        best = ", ".join(f"s{s}: {h['best']}" for s, h in per_seed.items() if h)

        def mean(key, runs=runs):
            return stats([h[key] for h in runs])["mean"]

        first, last = stats([h["logp_train"][0] for h in runs])["mean"], stats([h["logp_train"][-1] for h in runs])["mean"]
        out.append(f"| {m} | {collapsed} | {best} | {fmt(mean('em_last'))} → {fmt(mean('em_best'))} | "
                   f"{fmt(mean('nll_last'), 4)} → {fmt(mean('nll_best'), 4)} | {fmt(first, 2)} → {fmt(last, 2)} |")
    return out
