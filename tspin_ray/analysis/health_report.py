"""The report's health section: the best iterate, the self-play health figures per iterate, and a table of
held-out prompts with the annotated answer and each iterate's greedy answer.

    tspin-ray report --run runs/demo-real      (report.md, "Health and the best iterate")
"""

from __future__ import annotations

from tspin_ray.analysis.run_reader import PI0, Run

HEALTH = [  # (header, metrics key, digits)
    ("NLL of y (held-out)", "eval/nll", 4), ("NLL / best so far", "health/nll_vs_best", 2),
    ("logp y train", "health/logp_real_train", 2), ("logp y held-out", "health/logp_real_heldout", 2),
    ("distinct greedy", "health/distinct_greedy", 2), ("distinct y'", "health/distinct_samples", 2),
    ("y' tokens", "health/sample_tokens", 1),
]


def _cell(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def health_lines(r: Run) -> list[str]:
    """The best iterate by eval.select, then one row of health figures per evaluated iterate."""
    if not any(k.startswith("health/") for row in r.iterations.values() for k in row):
        return []
    lines = [f"### {r.label}", ""]
    if r.best:
        lines += [f"Best iterate: **{r.best['iterate']}** by {r.best.get('metric')} ({r.best.get('value', float('nan')):.4g}; "
                  f"`checkpoints/best` points to it, eval.select chooses the metric).", ""]
    lines += ["| iterate | " + " | ".join(h for h, _, _ in HEALTH) + " |", "|---" * (len(HEALTH) + 1) + "|"]
    for t in r.iterations:
        label = "pi_0" if t == PI0 else f"pi_{t + 1}"
        lines.append(f"| {label} | " + " | ".join(_cell(r.value(t, k), d) for _, k, d in HEALTH) + " |")
    return lines + [""]


def answers_table(r: Run, rows: int = 12) -> list[str]:
    """The first `rows` held-out prompts: the annotated answer and each iterate's greedy answer."""
    if not r.answers:
        return []
    labels = list(r.answers)
    by_label = {k: {a["prompt_id"]: a for a in v} for k, v in r.answers.items()}
    first = r.answers[labels[0]][:rows]

    def text(s: str) -> str:
        s = " ".join(str(s).split())
        return ((s[:60] + "...") if len(s) > 63 else s).replace("|", "\\|")

    lines = [f"### {r.label}", "", "| prompt | annotated | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
    for a in first:
        greedy = [text(by_label[k].get(a["prompt_id"], {}).get("greedy", "-")) for k in labels]
        lines.append(f"| {text(a['prompt'])} | {text(a['answer'])} | " + " | ".join(greedy) + " |")
    return lines + [""]
