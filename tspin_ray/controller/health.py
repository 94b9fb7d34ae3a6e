"""Self-play health: the figures that show an iterate collapsing, the warning, and the best iterate.

    .venv/bin/pytest tests/unit/controller/test_health.py

Logged with every evaluation (pi_0 and each iterate), as `health/*` in metrics.jsonl:
- `logp_real_train`, `logp_real_heldout`: the mean summed log-probability of the annotated answers y, on
  training and held-out rows. Falling while the loss falls is likelihood displacement: the pairwise losses
  push y down with y' (docs/concepts.md, "Self-play at toy scale").
- `distinct_greedy`: the share of distinct greedy answers over the held-out prompts (a collapsed model
  answers most prompts alike); `unfinished_greedy`: the share that reach eval.max_new_tokens without
  ending (a model that lost the answer form talks on: docs/results.md, the real-model study);
  `distinct_samples` and `sample_tokens`: the share of distinct samples y' and their mean length, per
  iteration.
- `nll_vs_best`: held-out NLL over the best so far; `best_iterate`: the iterate `eval.select` prefers.

An iterate whose held-out NLL exceeds `eval.collapse_nll_factor` x the best so far, whose share of
distinct greedy answers is below `eval.collapse_min_distinct` and below pi_0's, or whose share of
unfinished greedy answers is above `eval.collapse_max_unfinished` and above pi_0's, is reported in one
`warning:` line (pi_0 itself is only scored); with
`eval.stop_on_collapse` the run stops there (committed iterates stay). `checkpoints/best` points to the best
iterate by `eval.select`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa


def evaluation_figures(answers: dict[str, str], ended: dict[str, bool], heldout_nll: float, heldout_rows: int,
                       train_nll: float, train_rows: int) -> dict[str, float]:
    """Health figures of one evaluation: summed NLLs of y over held-out and training rows, the greedy answers
    and whether each ended (a stop id) before eval.max_new_tokens."""
    unfinished = sum(not e for e in ended.values())
    return {"health/logp_real_heldout": -heldout_nll / max(heldout_rows, 1),
            "health/logp_real_train": -train_nll / max(train_rows, 1),
            "health/distinct_greedy": len(set(answers.values())) / max(len(answers), 1),
            "health/unfinished_greedy": unfinished / max(len(answers), 1)}


def sample_figures(table: pa.Table | None) -> dict[str, float]:
    """The share of distinct samples y' and their mean length in tokens, over this iteration's own samples
    (SPIN's mixed-in rows carry the previous iteration's)."""
    if table is None or not table.num_rows:
        return {}
    own = max(table.column("source_iteration").to_pylist())
    samples = [tuple(g) for ids, s in zip(table.column("generated_ids").to_pylist(),
                                          table.column("source_iteration").to_pylist(), strict=True)
               if s == own for g in ids]
    return {"health/distinct_samples": len(set(samples)) / len(samples),
            "health/sample_tokens": sum(map(len, samples)) / len(samples)}


def selection(select: str) -> tuple[str, bool]:
    """The metrics key `eval.select` names and whether lower is better: nll, exact_match, or an lm-eval
    metric as lm_eval/<task>/<metric>."""
    if select == "nll":
        return "eval/nll", True
    return f"eval/{select}", False


@dataclass(frozen=True)
class Verdict:
    """What the health check says of the latest iterate, given every evaluated one before it."""
    label: str  # the latest iterate, e.g. pi_2
    best: str  # the best iterate so far by eval.select (the latest included)
    best_value: float
    key: str  # the metrics key eval.select names
    reasons: tuple[str, ...]  # why the latest looks collapsed; empty when it does not
    nll_vs_best: float

    @property
    def collapsed(self) -> bool:
        return bool(self.reasons)

    def figures(self) -> dict[str, float]:
        return {"health/best_iterate": int(self.best.split("_")[1]), "health/nll_vs_best": self.nll_vs_best}

    def warning(self, stops: bool) -> str:
        then = "the run stops here (eval.stop_on_collapse)" if stops else "eval.stop_on_collapse: true stops a run here"
        return (f"warning: {self.label} looks collapsed: {'; '.join(self.reasons)}. Best iterate: {self.best} "
                f"({self.key} {self.best_value:.4g}, eval.select; checkpoints/best); {then}")


def judge(history: list[tuple[str, dict]], e) -> Verdict:
    """The verdict on the last of `history` ((label, evaluation row) in order, pi_0 first), by the selection
    and thresholds of `e` (EvalConfig)."""
    nll_factor, min_distinct, max_unfinished = e.collapse_nll_factor, e.collapse_min_distinct, e.collapse_max_unfinished
    key, lower = selection(e.select)
    scored = [(label, row[key]) for label, row in history if _finite(row.get(key))]
    label, row = history[-1]
    best, best_value = (min if lower else max)(scored, key=lambda lv: lv[1]) if scored else (label, math.nan)
    earlier = [r["eval/nll"] for _, r in history[:-1] if _finite(r.get("eval/nll"))]
    nll, reasons = row.get("eval/nll"), []
    ratio = nll / min(earlier) if earlier and _finite(nll) and min(earlier) > 0 else 1.0
    if ratio > nll_factor:
        at = min((lv for lv in history[:-1] if _finite(lv[1].get("eval/nll"))), key=lambda lv: lv[1]["eval/nll"])[0]
        reasons.append(f"held-out NLL {nll:.4g} is {ratio:.2f}x the best so far ({min(earlier):.4g}, {at}; "
                       f"eval.collapse_nll_factor {nll_factor:g})")
    distinct, start = row.get("health/distinct_greedy"), history[0][1].get("health/distinct_greedy")
    # below the threshold and below pi_0's own share: a task whose answers repeat is not a collapse
    if len(history) > 1 and _finite(distinct) and distinct < min_distinct and (not _finite(start) or distinct < start):
        reasons.append(f"distinct greedy answers {distinct:.2f} of the held-out prompts < {min_distinct:g} "
                       f"(eval.collapse_min_distinct; pi_0 {start:.2f})")
    cut, cut0 = row.get("health/unfinished_greedy"), history[0][1].get("health/unfinished_greedy")
    # above the threshold and above pi_0's: a task whose answers outgrow the limit from the start is no collapse
    if len(history) > 1 and _finite(cut) and cut > max_unfinished and (not _finite(cut0) or cut > cut0):
        reasons.append(f"{cut:.2f} of the held-out greedy answers end unfinished at eval.max_new_tokens > "
                       f"{max_unfinished:g} (eval.collapse_max_unfinished; pi_0 {cut0:.2f})")
    return Verdict(label, best, best_value, key, tuple(reasons), ratio)


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def check_iterate(run, e, k: int, row: dict, say) -> Verdict:
    """The verdict on pi_k from its evaluation row and the committed ones before it in `run` (RunDir),
    with the thresholds of `e` (EvalConfig); says the warning when it looks collapsed. pi_0 is the first
    best iterate."""
    history = [("pi_0", run.entry("eval_0") or row)] + [(f"pi_{j + 1}", run.entry(f"iter_{j}")) for j in range(k - 1)]
    verdict = judge(history + [(f"pi_{k}", row)] if k else history, e)
    if verdict.collapsed:
        say(verdict.warning(stops=e.stop_on_collapse))
    if k == 0:
        run.mark_best(0, metric=verdict.key, value=verdict.best_value)
    return verdict
