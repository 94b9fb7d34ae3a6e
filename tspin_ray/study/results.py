"""Study results: collect every run's metrics, mean ± std per iteration, claim checks, tables and plots.

    tspin-ray study --config jobs/study-sorting.yaml     (writes results.json, results.md, results_*.png)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tspin_ray.analysis.figures import figure, iteration_axis, save_figure
from tspin_ray.rundir.store import RunDir, write_atomic
from tspin_ray.study.health import lines as health_lines
from tspin_ray.study.health import summary as health_summary
from tspin_ray.study.judge import distribution_summary, judge, markdown, plot_curves
from tspin_ray.study.plan import PI0, RESERVED_RUNS, Study, Timings, plan
from tspin_ray.study.stats import fmt, iteration_rows, mean_std, number, paired, plus_minus, stats, verdict


# ------------------------------------------------------------ collecting
@dataclasses.dataclass(frozen=True)
class Point:
    """One evaluation: `iteration` -1 is pi_0 (the same numbers for every method of a seed)."""
    method: str
    seed: int
    iteration: int
    exact_match: float | None  # None: the run has no such evaluation row
    nll: float | None


def collect(study: Study) -> dict:
    """Every number the tables, plots and claims use, read back from the runs' metrics.jsonl."""
    out = study.out
    points: list[Point] = []
    sft_full, alignment, timing = [], [], {"sft_s": [], "eval_s": [], "iteration_s": {}}
    for s in study.seeds:
        pi0 = iteration_rows(out / f"seed{s}" / "pi0").get(PI0, {})
        full = iteration_rows(out / f"seed{s}" / "sft_full").get(PI0, {})
        sft_full.append({"seed": s, "exact_match": number(full.get("eval/exact_match")),
                         "nll": number(full.get("eval/nll"))})
        for name in ("pi0", "sft_full"):
            e = RunDir(out / f"seed{s}" / name).entry("pi_0") or {}
            timing["sft_s"].append(e.get("seconds"))
        timing["eval_s"].append(number(pi0.get("timing/eval")))
        for m in study.methods:
            rows = iteration_rows(out / f"seed{s}" / m)
            points.append(Point(m, s, PI0, number(pi0.get("eval/exact_match")), number(pi0.get("eval/nll"))))
            for t in range(study.iterations):
                r = rows.get(t, {})
                points.append(Point(m, s, t, number(r.get("eval/exact_match")), number(r.get("eval/nll"))))
                timing["iteration_s"].setdefault(m, []).append(number(r.get("timing/iteration")))
                keys = ("train/logps/real", "train/logps/generated", "train/rewards/real", "train/rewards/generated")
                if all(number(r.get(k)) is not None for k in keys):
                    alignment.append({"method": m, "seed": s, "iteration": t, **{k: r[k] for k in keys}})
    return {"points": points, "sft_full": sft_full, "alignment": alignment, "timing": timing}


def summarise(study: Study, data: dict) -> dict:
    """Mean/std over seeds per method and column (pi0, 0 .. N-1), for EM and NLL, and the SFT-100% line."""
    cols = [PI0, *range(study.iterations)]
    summary: dict = {}
    for m in study.methods:
        summary[m] = {}
        for metric in ("exact_match", "nll"):
            summary[m][metric] = [stats([getattr(p, metric) for p in data["points"]
                                         if p.method == m and p.iteration == t]) for t in cols]
    full = {metric: stats([r[metric] for r in data["sft_full"]]) for metric in ("exact_match", "nll")}
    return {"columns": cols, "methods": summary, "sft_full": full}


def deltas(summary: dict, metric: str = "exact_match") -> dict[str, list[dict]]:
    """Per method and column: the change from the seed's own pi_0 (paired), mean ± std over seeds."""
    return {m: [paired(st, per[metric][0]) for st in per[metric]] for m, per in summary["methods"].items()}


def _claim(cid: str, claim: str, status: str, sentence: str, **numbers) -> dict:
    return {"id": cid, "claim": claim, "status": status, "sentence": sentence, **numbers}


def _not_measured(cid: str, claim: str, *needs: str) -> dict:
    return _claim(cid, claim, "not measured", f"({cid}) {claim}: not measured (needs complete runs of "
                  f"{', '.join(needs)} in the study).")


def _missing(*sts: dict | None) -> bool:
    return any(st is None or st["mean"] is None for st in sts)


def _final(summary: dict, m: str) -> dict:
    return summary["methods"][m]["exact_match"][-1]


def claim_monotonic(summary: dict, m: str = "tspin") -> dict:
    claim = "T-SPIN's mean exact match is non-decreasing from pi_0 over the iterations"
    if m not in summary["methods"] or _missing(*summary["methods"][m]["exact_match"]):
        return _not_measured("a", claim, m)
    seq = summary["methods"][m]["exact_match"]
    steps = [paired(seq[i], seq[i + 1]) for i in range(len(seq) - 1)]  # per-seed drop at each step
    worst = max(steps, key=lambda d: d["mean"])
    if worst["mean"] <= 0:
        status = "holds" if worst["std"] is not None else "inconclusive"
    else:  # a real drop must exceed the spread of its per-seed drops
        status = "does not hold" if worst["std"] is not None and worst["mean"] > worst["std"] else "inconclusive"
    path = " → ".join(fmt(x["mean"]) for x in seq)
    sentence = (f"(a) {claim}: mean EM {path}; largest mean drop between consecutive iterates "
                f"{max(0.0, worst['mean']):.3f} (std over seeds {fmt(worst['std'])}): **{status}**.")
    return _claim("a", claim, status, sentence, means=[x["mean"] for x in seq],
                  largest_drop=max(0.0, worst["mean"]), drop_std=worst["std"])


def claim_spin_peaks(summary: dict, cols: list[int], m: str = "spin") -> dict:
    """Over SPIN's own iterates (after iterations 0 .. N-1): the best one comes before the last, and the
    last is below it."""
    claim = "SPIN peaks before its last iteration and then degrades"
    if m not in summary["methods"] or _missing(*summary["methods"][m]["exact_match"]):
        return _not_measured("b", claim, m)
    seq = summary["methods"][m]["exact_match"][1:]  # iterates only: pi_0 is not SPIN's
    its = cols[1:]
    if len(seq) < 2:
        return _claim("b", claim, "inconclusive", f"(b) {claim}: needs at least 2 iterations: **inconclusive**.")
    peak = max(range(len(seq) - 1), key=lambda i: seq[i]["mean"])
    last = seq[-1]
    d = paired(seq[peak], last)  # > 0: the last iterate is below the earlier peak
    status = verdict(d["mean"], d["std"])
    pi0 = summary["methods"][m]["exact_match"][0]["mean"]
    sentence = (f"(b) {claim}: best before the last at iteration {its[peak]} ({mean_std(seq[peak])}; pi_0 "
                f"{fmt(pi0)}), last {mean_std(last)}, per-seed drop {plus_minus(d)}: **{status}**.")
    return _claim("b", claim, status, sentence, peak_iteration=its[peak], peak=seq[peak]["mean"],
                  last=last["mean"], difference=d["mean"], difference_std=d["std"], pi0=pi0)


def claim_pair(cid: str, claim: str, a_label: str, a: dict | None, b_label: str, b: dict | None,
               needs: tuple[str, ...]) -> dict:
    """claim: a > b (final exact matches), judged on the per-seed differences a - b."""
    if _missing(a, b):
        return _not_measured(cid, claim, *needs)
    d = paired(a, b)
    status = verdict(d["mean"], d["std"])
    sentence = (f"({cid}) {claim}: {a_label} {mean_std(a)} vs {b_label} {mean_std(b)}, per-seed difference {plus_minus(d)}: "
                f"**{status}**.")
    return _claim(cid, claim, status, sentence, a=a["mean"], a_std=a["std"], b=b["mean"], b_std=b["std"],
                  difference=d["mean"], difference_std=d["std"])


def claim_alignment(alignment: list[dict], m: str = "tspin") -> dict:
    claim = ("T-SPIN keeps the real responses above the synthetic ones in both log-likelihood and reward at "
             "every iteration")
    rows = [r for r in alignment if r["method"] == m]
    if not rows:
        return _not_measured("e", claim, m)
    ok = [r["train/logps/real"] > r["train/logps/generated"] and r["train/rewards/real"] > r["train/rewards/generated"]
          for r in rows]
    frac = sum(ok) / len(ok)
    # a count, not a difference of means: all pairs = holds, at most half = does not hold
    status = "holds" if frac == 1.0 else "does not hold" if frac <= 0.5 else "inconclusive"
    sentence = (f"(e) {claim}: real > synthetic on both in {sum(ok)} of {len(ok)} (seed, iteration) pairs "
                f"({frac:.0%}; holds = all, does not hold = at most half): **{status}**.")
    return _claim("e", claim, status, sentence, fraction=frac, pairs=len(ok))


def setting(method: str) -> str:
    """A method's hyper-parameter setting: what follows the first '.' of its name ("" for the base
    names). `tspin.lr1e-4` is T-SPIN in setting `lr1e-4`; claims compare methods of one setting."""
    return method.partition(".")[2]


def claims(summary: dict, alignment: list[dict], suffix: str = "") -> list[dict]:
    """The claim checks among the methods of one setting (`suffix`: "" or e.g. "lr1e-4")."""
    ms = summary["methods"]

    def name(m):
        return f"{m}.{suffix}" if suffix else m

    def final(m):
        return _final(summary, name(m)) if name(m) in ms else None

    return [
        claim_monotonic(summary, name("tspin")),
        claim_spin_peaks(summary, summary["columns"], name("spin")),
        claim_pair("c", "T-SPIN on the annotated fraction beats SFT on 100%", "T-SPIN final", final("tspin"),
                   "SFT-100%", summary["sft_full"]["exact_match"], (name("tspin"),)),
        claim_pair("d", "Removing T-SPIN's historical term hurts", "T-SPIN final", final("tspin"),
                   "T-SPIN without history final", final("tspin_no_history"),
                   (name("tspin"), name("tspin_no_history"))),
        claim_alignment(alignment, name("tspin")),
        claim_pair("f", "SPACE beats SPIN", "SPACE final", final("space"), "SPIN final", final("spin"),
                   (name("space"), name("spin"))),
    ]


# ------------------------------------------------------------ writing
def _col(t: int) -> str:
    return "pi0" if t == PI0 else str(t)


def metric_table(summary: dict, metric: str, digits: int) -> list[str]:
    cols = summary["columns"]
    lines = ["| method | " + " | ".join(_col(t) for t in cols) + " |", "|---|" + "---|" * len(cols)]
    for m, per in summary["methods"].items():
        lines.append(f"| {m} | " + " | ".join(mean_std(st, digits) for st in per[metric]) + " |")
    return lines


def delta_table(per_method: dict[str, list[dict]]) -> list[str]:
    n = len(next(iter(per_method.values())))
    lines = ["| method | " + " | ".join(_col(t) for t in range(n - 1)) + " |", "|---|" + "---|" * (n - 1)]
    for m, cells in per_method.items():
        lines.append(f"| {m} | " + " | ".join(
            "–" if c["mean"] is None else f"{c['mean']:+.3f}" + ("" if c["std"] is None else f" ± {c['std']:.3f}")
            for c in cells[1:]) + " |")
    return lines


def timing_lines(study: Study, timings: dict[str, float], timing: dict) -> list[str]:
    lines = ["| run | " + " | ".join(f"seed {s}" for s in study.seeds) + " |", "|---|" + "---|" * len(study.seeds)]
    for name in [*RESERVED_RUNS, *study.methods]:
        cells = [fmt(timings.get(f"seed{s}/{name}"), 0) for s in study.seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sft = stats([number(x) for x in timing["sft_s"]])
    ev = stats(timing["eval_s"])
    lines += ["", f"Mean seconds: one SFT stage (pi0 and sft_full) {fmt(sft['mean'], 1)}; one evaluation "
              f"{fmt(ev['mean'], 1)}; one self-play iteration (generation, training, checkpoint, evaluation): " +
              ", ".join(f"{m} {fmt(stats(v)['mean'], 1)}" for m, v in timing["iteration_s"].items()) + "."]
    return lines


def render_markdown(study: Study, results: dict, command: str) -> str:
    summary = results["summary"]
    full = summary["sft_full"]
    n = len(study.seeds)
    lines = [f"# Study: {study.out}", "", f"Made by `{command}`.", "",
             f"{n} seed(s) ({', '.join(map(str, study.seeds))}); every method starts from the same pi_0 per seed "
             f"(SFT on {study.fraction:.0%} of the training rows) and trains {study.iterations} iteration(s) on "
             f"that same {study.fraction:.0%}. Cells are mean ± std (n-1) over seeds of the held-out greedy exact "
             f"match; column pi0 is pi_0 before self-play, column t the policy after iteration t.", "",
             "## Exact match", ""]
    lines += metric_table(summary, "exact_match", 3)
    lines += ["", f"SFT on {study.full_fraction:.0%} (the baseline): exact match {mean_std(full['exact_match'])}, "
              f"NLL {mean_std(full['nll'], 4)}.", "", "![exact match](results_em.png)", "",
              "## NLL of the held-out real responses (per token, nats; lower is better)", ""]
    lines += metric_table(summary, "nll", 4)
    lines += ["", "![NLL](results_nll.png)", "", "## Change in exact match from the seed's own pi_0", "",
              "Every method of a seed starts from the same pi_0, and pi_0 itself varies a lot from seed to seed, "
              "so comparisons are made seed by seed: each cell is the mean ± std over seeds of (exact match "
              "after iteration t) - (that seed's pi_0).", ""]
    lines += delta_table(results["deltas"])
    lines += ["", "![change from pi_0](results_delta.png)", ""]
    if study.claims or study.distribution is not None:
        lines += markdown(study, results) + [""]
    lines += health_lines(study, results["health"]) + [""]
    lines += ["## Claim checks", "",
              "Computed from the numbers above, on per-seed (paired) differences: a mean difference within one "
              "std of those differences is inconclusive (and every difference is, with one seed).", ""]
    lines += [f"- {c['sentence']}" for c in results["claims"]]
    for suffix, found in results.get("claims_by_setting", {}).items():
        lines += ["", f"Setting `{suffix}` (methods named `<method>.{suffix}`):", ""]
        lines += [f"- {c['sentence']}" for c in found]
    if results["proto_reused"]:
        lines += ["", "Proto caches shared (y0 sampled once per seed): " + "; ".join(
            f"{k} ← {v}" for k, v in sorted(results["proto_reused"].items())) + "."]
    lines += ["", "## Wall time per run (seconds, summed over the invocations that worked on it)", ""]
    lines += timing_lines(study, results["wall_s"], results["timing"])
    return "\n".join(lines) + "\n"


def plot(study: Study, summary: dict, metric: str, path: Path, title: str, ylabel: str) -> None:
    series = {m: per[metric] for m, per in summary["methods"].items()}
    full = summary["sft_full"][metric]
    ref = (f"SFT on {study.full_fraction:.0%}", full) if full["mean"] is not None else None
    plot_series(summary["columns"], series, path, title, ylabel, ref)


def plot_series(cols: list[int], series: dict[str, list[dict]], path: Path, title: str, ylabel: str,
                ref: tuple[str, dict] | None = None) -> None:
    """One line per method (mean over seeds, ±1 std band); `ref` a dashed horizontal line with its band.
    Methods of one setting share a colour index; a `.setting` suffix draws them dashed."""

    fig = figure(8, 4.8)
    ax = fig.add_subplot()
    ax.set_title(title)
    bases = list(dict.fromkeys(m.partition(".")[0] for m in series))
    for m, stats_ in series.items():
        color = f"C{bases.index(m.partition('.')[0]) % 10}"
        xs = [t for t, st in zip(cols, stats_, strict=True) if st["mean"] is not None]
        means = [st["mean"] for st in stats_ if st["mean"] is not None]
        ax.plot(xs, means, marker="o", color=color, label=m, ls="--" if setting(m) else "-")
        sds = [st["std"] for st in stats_ if st["mean"] is not None]
        if xs and all(sd is not None for sd in sds):
            ax.fill_between(xs, [a - b for a, b in zip(means, sds, strict=True)],
                            [a + b for a, b in zip(means, sds, strict=True)], color=color, alpha=0.1, lw=0)
    if ref is not None:
        label, st = ref
        ax.axhline(st["mean"], color="black", ls=":", lw=1.2, label=label)
        if st["std"] is not None:
            ax.axhspan(st["mean"] - st["std"], st["mean"] + st["std"], color="black", alpha=0.06, lw=0)
    iteration_axis(ax, "after iteration (pi0 = before self-play)")
    ax.set_ylabel(ylabel)
    fig.legend(loc="outside lower center", ncol=min(5, len(series) + 1), fontsize=8, frameon=False)
    save_figure(fig, path)


def write_results(study: Study, command: str) -> Path:
    """Collect every run's numbers and write results.json, results.md and the plots."""
    data = collect(study)
    summary = summarise(study, data)
    reuse_path = study.out / "proto_reuse.json"
    all_reused = json.loads(reuse_path.read_text()) if reuse_path.exists() else {}
    keys = {spec.key for spec in plan(study)}
    wall = {k: v for k, v in Timings(study.out / "timings.json").seconds.items() if k in keys}
    results = {
        "command": command,
        "study": {"seeds": list(study.seeds), "iterations": study.iterations, "fraction": study.fraction,
                  "full_fraction": study.full_fraction, "methods": study.methods, "base": study.base},
        "points": [dataclasses.asdict(p) for p in data["points"]],
        "sft_full": data["sft_full"],
        "alignment": data["alignment"],
        "summary": summary,
        "deltas": deltas(summary),
        "claims": claims(summary, data["alignment"]),
        "claims_by_setting": {x: claims(summary, data["alignment"], x)
                              for x in sorted({setting(m) for m in study.methods} - {""})},
        "declared_claims": [judge(study, c) for c in study.claims],
        "health": health_summary(study),
        "distribution": distribution_summary(study) if study.distribution is not None else {},
        "proto_reused": {k: v for k, v in all_reused.items() if k in keys},
        "wall_s": wall,
        "timing": data["timing"],
    }
    out = study.out
    write_atomic(out / "results.json", json.dumps(results, indent=1, default=str).encode())
    plot(study, summary, "exact_match", out / "results_em.png", "Held-out exact match (mean ± std over seeds)",
         "exact match")
    plot(study, summary, "nll", out / "results_nll.png", "Held-out NLL of the real responses (mean ± std over seeds)",
         "NLL per token (nats)")
    if study.distribution is not None:
        plot_curves(study, results)
    plot_series(summary["columns"], results["deltas"], out / "results_delta.png",
                "Exact match minus the seed's own pi_0 (mean ± std over seeds)", "change in exact match",
                ("no change", {"mean": 0.0, "std": None}))
    md = out / "results.md"
    write_atomic(md, render_markdown(study, results, command).encode())
    return md
