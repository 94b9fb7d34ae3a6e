"""Judging the claims a study config declared: curves per run and seed, paired verdicts, their tables and
plots.

    .venv/bin/pytest tests/unit/study/test_study.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tspin_ray.analysis.figures import figure, save_figure
from tspin_ray.rundir.store import RunDir
from tspin_ray.study.claims import DISTRIBUTION_METRICS, GREEDY, LOWER_IS_BETTER, SIDES, SPLITS, Claim, side
from tspin_ray.study.plan import PI0
from tspin_ray.study.stats import iteration_rows, mean_std, number, paired, plus_minus, stats, verdict


# ------------------------------------------------------------ reading the runs
def _run_root(study, seed: int, run: str) -> Path:
    return study.out / f"seed{seed}" / run


def _iterate(study, name: str, seed: int) -> int | None:
    """Which iterate a claim's side reads: 0 (pi_0) .. iterations; None when a best iterate is not named (yet)."""
    run, iterate = side(name)
    if run in SIDES:
        return 0
    if iterate == "best":
        best = RunDir(_run_root(study, seed, run)).entry("best")
        return None if best is None else int(str(best["iterate"]).removeprefix("pi_"))
    return int(iterate) if iterate else study.iterations


def curve(study, name: str, seed: int, metric: str, checkpoint: str | None = None) -> list[float] | None:
    """The metric of a claim side's iterate (`run`, `run@k`, `run@best`; or of `checkpoint`, a distribution
    metric) for one seed: per temperature (a list of one for greedy metrics); None when it is not there (yet)."""

    run = side(name)[0]
    k = _iterate(study, name, seed)
    if k is None:
        return None
    if metric in GREEDY:
        root = _run_root(study, seed, run)
        if not (root / "metrics.jsonl").exists():  # not run (yet), or left out by --methods
            return None
        row = iteration_rows(root).get(PI0 if k == 0 else k - 1, {})
        v = number(row.get(f"eval/{metric}"))
        return None if v is None else [v]
    # a method's distribution.json scores its own iterates; pi_0 is scored once, in the seed's pi0 run
    path = _run_root(study, seed, "pi0" if k == 0 and checkpoint is None else run) / "distribution.json"
    if not path.exists():
        return None
    split, _, metric_name = metric.rpartition("/")
    ckpt = checkpoint or f"pi_{k}"
    got = json.loads(path.read_text())["checkpoints"].get(ckpt, {}).get(split, {}).get(metric_name)
    # a non-finite score (NaN) is no measurement: judged "not measured", never "does not hold"
    return got if got is None or all(math.isfinite(v) for v in got) else None


def judge(study, claim: Claim) -> dict:

    a = [curve(study, claim.a, s, claim.metric) for s in study.seeds]
    b = [curve(study, claim.b, s, claim.metric) for s in study.seeds]
    base = {"id": claim.id, "claim": claim.claim, "a": claim.a, "b": claim.b, "metric": claim.metric, "at": claim.at}
    if any(x is None for x in a + b):
        return {**base, "status": "not measured", "sentence": f"({claim.id}) {claim.claim}: not measured (needs "
                f"complete runs of {claim.a} and {claim.b} for seeds {', '.join(map(str, study.seeds))})."}
    temps = [None] if claim.metric in GREEDY else list(study.distribution.temperatures)

    def at(values, j):
        return stats([v[j] for v in values])

    def best(values):
        return max(range(len(temps)), key=lambda j: claim.sign * at(values, j)["mean"])

    if claim.metric in GREEDY or claim.at not in ("best", "all"):
        pairs = [(0, 0)] if claim.metric in GREEDY else [(temps.index(float(claim.at)),) * 2]
    elif claim.at == "best":
        pairs = [(best(a), best(b))]
    else:
        pairs = [(j, j) for j in range(len(temps))]
    parts, statuses, numbers = [], [], []
    for ja, jb in pairs:
        sa, sb = at(a, ja), at(b, jb)
        d = paired(sa, sb)
        signed = claim.sign * d["mean"]
        status = verdict(signed, d["std"])
        statuses.append(status)
        where = "" if temps[0] is None else (f" at T {temps[ja]:g}" if ja == jb else
                                            f" (T {temps[ja]:g} vs T {temps[jb]:g})")
        parts.append(f"{claim.a} {mean_std(sa)} vs {claim.b} {mean_std(sb)}{where}, difference {plus_minus(d)}: {status}")
        numbers.append({"t_a": temps[ja], "t_b": temps[jb], "a": sa["mean"], "b": sb["mean"],
                        "difference": d["mean"], "difference_std": d["std"], "status": status})
    overall = statuses[0] if len(set(statuses)) == 1 else "inconclusive"
    lower = " (lower is better)" if claim.sign < 0 else ""
    how = "greedy" if claim.metric in GREEDY else f"at {claim.at}"
    sentence = f"({claim.id}) {claim.claim} [{claim.metric}{lower}, {how}]: " + "; ".join(parts) + \
        f" → **{overall}**."
    return {**base, "status": overall, "sentence": sentence, "comparisons": numbers}


# ------------------------------------------------------------ tables and curves
def distribution_summary(study) -> dict:
    """split -> metric -> run -> [stats per temperature] over seeds, for pi0, sft_full and each method."""

    out: dict = {}
    for split in SPLITS:
        for name in DISTRIBUTION_METRICS:
            for run in [*SIDES, *study.methods]:
                curves = [curve(study, run, s, f"{split}/{name}") for s in study.seeds]
                if all(c is None for c in curves):
                    continue
                cols = len(study.distribution.temperatures)
                out.setdefault(split, {}).setdefault(name, {})[run] = [
                    stats([c[j] if c is not None else None for c in curves]) for j in range(cols)]
    return out


def iterate_table(study, split: str, name: str, temperature: float) -> list[str]:
    """One metric at one temperature for pi_0 and every iterate of each method (mean ± std over seeds)."""

    j = list(study.distribution.temperatures).index(temperature)
    cols = range(study.iterations + 1)
    lines = ["| method | pi0 | " + " | ".join(f"{t}" for t in range(study.iterations)) + " |",
             "|---|" + "---|" * len(cols)]
    for m in study.methods:
        cells = []
        for t in cols:
            runs = [("pi0", f"seed{s}") if t == 0 else (m, f"seed{s}") for s in study.seeds]
            vals = [curve(study, run, int(seed[4:]), f"{split}/{name}", f"pi_{t}") for run, seed in runs]
            cells.append(mean_std(stats([v[j] if v is not None else None for v in vals])))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def markdown(study, results: dict) -> list[str]:

    lines = ["## Claims declared in the config before the runs", "",
             "Each compares final iterates (or the one a side names: run@k after iteration k, run@best) on per-seed "
             "(paired) differences: holds when the mean difference "
             "is better than zero by more than one std of the differences, does not hold when worse by more, "
             "else inconclusive.", ""]
    lines += [f"- {c['sentence']}" for c in results["declared_claims"]] or ["- (none declared)"]
    if study.distribution is None:
        return lines
    temps = study.distribution.temperatures
    spec = study.distribution
    lines += ["", "## The distribution over valid answers", "",
              f"Final iterates (pi0 and sft_full: their pi_0), first {spec.prompts} prompts of each split, "
              f"mean ± std over seeds, per sampling temperature. Exact metrics (tspin_ray/study/distribution.py); "
              f"sampled ones from {spec.samples} samples per prompt. `heldout`: the held-out prompts; `train`: "
              f"the annotated prompts every method trained on (one labelled answer each).", ""]
    t1 = min(temps, key=lambda t: abs(t - 1.0))
    for split in results["distribution"]:
        lines += [f"### {split}: validity at T {t1:g} after each iteration (column t: after iteration t)", ""]
        lines += iterate_table(study, split, "validity", t1) + [""]
    for split, per_metric in results["distribution"].items():
        for name, runs in per_metric.items():
            lower = " (lower is better)" if name in LOWER_IS_BETTER else ""
            lines += [f"### {split}: {name}{lower}", "", "| run | " + " | ".join(f"T {t:g}" for t in temps) + " |",
                      "|---|" + "---|" * len(temps)]
            lines += [f"| {run} | " + " | ".join(mean_std(st) for st in cells) + " |" for run, cells in runs.items()]
            lines.append("")
        lines += [f"![{split} curves](results_distribution_{split}.png)", ""]
    return lines


def plot_curves(study, results: dict) -> None:
    """Per split: validity, coverage and both KLs against temperature, one line per run (± 1 std)."""

    temps = list(study.distribution.temperatures)
    for split, per_metric in results["distribution"].items():
        names = [n for n in ("validity", "coverage", "kl_uniform_model", "kl_model_uniform") if n in per_metric]
        fig = figure(11, 7)
        for i, name in enumerate(names):
            ax = fig.add_subplot(2, 2, i + 1)
            ax.set_title(f"{split}: {name}", fontsize=10)
            for k, (run, cells) in enumerate(per_metric[name].items()):
                means = [c["mean"] for c in cells]
                if any(m is None for m in means):
                    continue
                ax.plot(temps, means, marker="o", ms=3, color=f"C{k % 10}", label=run,
                        ls=":" if run in SIDES else "-")
                if all(c["std"] is not None for c in cells):
                    ax.fill_between(temps, [m - c["std"] for m, c in zip(means, cells, strict=True)],
                                    [m + c["std"] for m, c in zip(means, cells, strict=True)], color=f"C{k % 10}",
                                    alpha=0.08, lw=0)
            ax.set_xlabel("sampling temperature")
            ax.grid(True, alpha=0.3)
            if name.startswith("kl_"):
                ax.set_yscale("log")
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=6, fontsize=8, frameon=False)
        save_figure(fig, study.out / f"results_distribution_{split}.png")
