"""`tspin-ray report`: plots and report.md for one run directory, or a comparison of several.

    tspin-ray report --run runs/demo                        (-> runs/demo/report/report.md)
    tspin-ray report --run runs/tspin --run runs/sft        (-> runs/tspin/report-compare/report.md)
    .venv/bin/pytest tests/unit/analysis/test_report.py

Reads only files: metrics.jsonl (rows written by the driver), config.yaml, manifest.json and the
generation shards; nothing needs Ray or a GPU, so it works on a copy of a finished or a running run.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import matplotlib
import matplotlib.colors

# Figures are built as bare `Figure`s, never through pyplot: savefig then renders with Agg whatever the
# process's backend is, no window opens (headless machines), and a notebook's backend is left alone.
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from tspin_ray.analysis.figures import figure, iteration_axis, save_figure
from tspin_ray.analysis.health_report import answers_table, health_lines
from tspin_ray.analysis.run_reader import PI0, Run, finite, load_run  # noqa: F401 - load_run: part of this API
from tspin_ray.errors import UserError
from tspin_ray.rundir.store import write_atomic

PLOTS = ("eval", "nll", "advantages", "alignment", "lengths", "timings", "loss")
# Wall-clock segments of one iteration, bottom to top, with their colours.
SEGMENTS = (("generate", "#4c72b0"), ("train after generation", "#dd8452"), ("checkpoint", "#55a868"),
            ("eval", "#c44e52"), ("other", "#8c8c8c"))


# ------------------------------------------------------------ plotting helpers
def _colors(runs: list[Run]) -> dict[str, str]:
    palette = matplotlib.colormaps["tab10"].colors
    return {r.label: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, r in enumerate(runs)}


def _no_data(ax, why: str) -> None:
    ax.text(0.5, 0.5, f"no data\n({why})", ha="center", va="center", transform=ax.transAxes,
            fontsize=11, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(fig: Figure, colors: dict, labels: list[str], styles: tuple = ()) -> None:
    """One legend below the plot: a colour per run, then what each line style means. Keeping runs and
    styles apart keeps the legend at n_runs + n_styles entries instead of their product."""
    if not labels:
        return  # nothing drawn: a key to no curves is noise
    handles = [Line2D([], [], color=colors[lab], lw=2, label=lab) for lab in dict.fromkeys(labels)]
    handles += [Line2D([], [], color="#444444", ls=ls, lw=1.5, label=what) for ls, what in styles]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=2 if len(handles) > 3 else len(handles),
                   fontsize=8, frameon=False)


# ------------------------------------------------------------ the plots
# Each returns None when it drew something, else why it could not (for the "no data" note).
EVAL_X = "after iteration (pi0 = before self-play)"


def plot_eval(runs: list[Run], colors: dict, path: Path) -> str | None:
    return _line_plot(runs, colors, path, "eval/exact_match", "Held-out exact match (greedy decoding)",
                      "exact match", "no eval/exact_match in any iteration row")


def plot_nll(runs: list[Run], colors: dict, path: Path) -> str | None:
    return _line_plot(runs, colors, path, "eval/nll", "Held-out NLL of the real responses",
                      "NLL per token (nats)", "no eval/nll in any iteration row")


def _line_plot(runs, colors, path, key, title, ylabel, why) -> str | None:
    fig = figure(8, 4.8)
    ax = fig.add_subplot()
    ax.set_title(title)
    drawn = []
    for r in runs:
        xs, ys = r.series(key)
        if xs:
            ax.plot(xs, ys, marker="o", color=colors[r.label])
            drawn.append(r.label)
    if drawn:
        iteration_axis(ax, EVAL_X)
        ax.set_ylabel(ylabel)
        _legend(fig, colors, drawn)
    else:
        _no_data(ax, why)
    save_figure(fig, path)
    return None if drawn else why


def benchmark_keys(runs: list[Run]) -> list[str]:
    """The eval/lm_eval/<task>/<metric> keys any run's iteration rows hold (eval.lm_eval)."""
    return sorted({k for r in runs for row in r.iterations.values() for k in row if k.startswith("eval/lm_eval/")})


def plot_benchmarks(runs: list[Run], colors: dict, path: Path) -> str | None:
    """One panel per lm-evaluation-harness score, one line per run."""
    keys = benchmark_keys(runs)
    fig = figure(8, 2.6 * max(1, len(keys)))
    for i, key in enumerate(keys or ["-"]):
        ax = fig.add_subplot(max(1, len(keys)), 1, i + 1)
        ax.set_title(key.removeprefix("eval/lm_eval/"))
        for r in runs:
            xs, ys = r.series(key)
            if xs:
                ax.plot(xs, ys, marker="o", color=colors[r.label])
        iteration_axis(ax, EVAL_X)
    if not keys:
        _no_data(fig.axes[0], "no eval/lm_eval scores in any iteration row")
    _legend(fig, colors, [r.label for r in runs])
    save_figure(fig, path)
    return None if keys else "no eval/lm_eval scores in any iteration row"


def plot_advantages(runs: list[Run], colors: dict, path: Path) -> str | None:
    """T-SPIN: current (solid) and historical (dashed) advantage; other objectives: reward margin (dotted)."""
    fig = figure(8, 4.8)
    ax = fig.add_subplot()
    ax.set_title("Advantages (T-SPIN) / reward margins (SPIN, SPACE); iteration means")
    curves = (("train/advantage/current", "-", "current advantage (T-SPIN)"),
              ("train/advantage/historical", "--", "historical advantage (T-SPIN)"),
              ("train/rewards/margins", ":", "reward margin"))
    drawn, used = [], {}
    for r in runs:
        mine = curves[:2] if any(r.series(k)[0] for k, _, _ in curves[:2]) else curves[2:]
        for key, style, what in mine:
            xs, ys = r.series(key)
            if xs:
                ax.plot(xs, ys, style, marker="o", color=colors[r.label])
                drawn.append(r.label)
                used[style] = what
    if drawn:
        ax.axhline(0.0, color="black", lw=0.8, alpha=0.5)
        iteration_axis(ax, "iteration")
        ax.set_ylabel("mean over the iteration's steps")
        _legend(fig, colors, drawn, tuple(used.items()))
    else:
        _no_data(ax, "no advantages or reward margins, e.g. SFT")
    save_figure(fig, path)
    return None if drawn else "no advantages or reward margins"


def plot_alignment(runs: list[Run], colors: dict, path: Path) -> str | None:
    """The T-SPIN paper's check: real responses keep a higher reward and log-likelihood than synthetic."""
    fig = figure(11, 4.8)
    fig.suptitle("Alignment check: real vs synthetic responses (iteration means)")
    drawn = []
    for i, (kind, title, ylabel) in enumerate((("rewards", "reward", "mean reward"),
                                               ("logps", "log-likelihood", "mean log-likelihood (nats)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.set_title(title)
        here = False
        for r in runs:
            for side, style in (("real", "-"), ("generated", "--")):
                xs, ys = r.series(f"train/{kind}/{side}")
                if xs:
                    ax.plot(xs, ys, style, marker="o", color=colors[r.label])
                    drawn.append(r.label)
                    here = True
        if here:
            iteration_axis(ax, "iteration")
            ax.set_ylabel(ylabel)
        else:
            _no_data(ax, f"no train/{kind}/* metrics")
    _legend(fig, colors, drawn, (("-", "real"), ("--", "synthetic")))
    save_figure(fig, path)
    return None if drawn else "no reward or log-likelihood metrics"


def plot_lengths(runs: list[Run], colors: dict, path: Path) -> str | None:
    fig = figure(8, 4.8)
    ax = fig.add_subplot()
    ax.set_title("Mean response length: samples of pi_t vs real responses")
    drawn = []
    for r in runs:
        if not r.lengths:
            continue
        ts = sorted(r.lengths)
        c = colors[r.label]
        ax.plot(ts, [r.lengths[t][0] for t in ts], "-", marker="o", color=c)
        ax.plot(ts, [r.lengths[t][1] for t in ts], "--", color=c, alpha=0.7)
        drawn.append(r.label)
    if drawn:
        iteration_axis(ax, "iteration t (samples of pi_t)")
        ax.set_ylabel("mean tokens per response")
        _legend(fig, colors, drawn, (("-", "generated (synthetic)"), ("--", "real")))
    else:
        _no_data(ax, "no generations/iter_*/ shards")
    save_figure(fig, path)
    return None if drawn else "no generation shards"


def segments(row: dict) -> dict[str, float]:
    """Wall-clock split of one iteration. Training streams from generation, so the two overlap: the
    'generate' bar is the time until the last sample (training already running), and 'train after
    generation' the rest of training; the segments then add up to timing/iteration."""
    def get(k):
        return finite(row.get(k)) or 0.0

    gen, train = get("timing/generate"), get("timing/train")
    parts = {"generate": gen, "train after generation": max(0.0, train - gen),
             "checkpoint": get("timing/checkpoint"), "eval": get("timing/eval")}
    total = finite(row.get("timing/iteration"))
    parts["other"] = max(0.0, total - sum(parts.values())) if total is not None else 0.0
    return parts


def plot_timings(runs: list[Run], colors: dict, path: Path) -> str | None:
    with_data = [r for r in runs if any(sum(segments(row).values()) > 0 for row in r.iterations.values())]
    fig = figure(8, 1.2 + 2.6 * max(1, len(with_data)))
    if not with_data:
        ax = fig.add_subplot()
        ax.set_title("Wall-clock time per iteration")
        _no_data(ax, "no timing/* metrics")
        save_figure(fig, path)
        return "no timing metrics"
    fig.suptitle("Wall-clock time per iteration (pi0 = evaluation of pi_0)")
    axes = fig.subplots(len(with_data), 1, squeeze=False, sharex=True)[:, 0]
    for ax, r in zip(axes, with_data, strict=True):
        ts = list(r.iterations)
        bottom = [0.0] * len(ts)
        for name, color in SEGMENTS:
            h = [segments(r.iterations[t])[name] for t in ts]
            ax.bar(ts, h, bottom=bottom, color=color, width=0.7)
            bottom = [b + x for b, x in zip(bottom, h, strict=True)]
        ax.set_title(r.label, fontsize=10)
        ax.set_ylabel("seconds")
        iteration_axis(ax, "iteration" if ax is axes[-1] else "")
    fig.legend(handles=[Patch(color=c, label=n) for n, c in SEGMENTS], loc="outside lower center",
               ncol=len(SEGMENTS), fontsize=8, frameon=False)
    save_figure(fig, path)
    return None


def plot_loss(runs: list[Run], colors: dict, path: Path) -> str | None:
    fig = figure(11, 4.8)
    fig.suptitle("Training loss per optimizer step")
    ax_sft, ax_sp = fig.subplots(1, 2)
    ax_sft.set_title("SFT stage (training pi_0)")
    ax_sp.set_title("Self-play (dotted lines: an iteration starts)")
    drawn_sft, drawn_sp = [], []
    for r in runs:
        c = colors[r.label]
        pts = [(row.get("step"), finite(row.get("loss"))) for row in r.sft]
        pts = [(s, v) for s, v in pts if isinstance(s, int) and v is not None]
        if pts:
            ax_sft.plot(*zip(*pts, strict=True), color=c)
            drawn_sft.append(r.label)
        xs, ys, starts, last_t = [], [], [], object()
        for i, row in enumerate(r.train, start=1):  # a running step: steps restart every iteration
            if row.get("iteration") != last_t:
                starts.append(i)
                last_t = row.get("iteration")
            v = finite(row.get("loss"))
            if v is not None:
                xs.append(i)
                ys.append(v)
        if xs:
            ax_sp.plot(xs, ys, color=c)
            for s in starts[1:]:
                ax_sp.axvline(s - 0.5, color=c, ls=":", alpha=0.6)
            drawn_sp.append(r.label)
    for ax, drawn, xlabel, why in ((ax_sft, drawn_sft, "SFT step", "no SFT stage (pi_0 given) or no sft rows"),
                                   (ax_sp, drawn_sp, "training step, counted across iterations", "no train rows")):
        if drawn:
            ax.set_xlabel(xlabel)
            ax.set_ylabel("loss")
            ax.grid(True, alpha=0.3)
        else:
            _no_data(ax, why)
    _legend(fig, colors, drawn_sft + drawn_sp)
    save_figure(fig, path)
    return None if (drawn_sft or drawn_sp) else "no sft or train rows"


PLOTTERS: dict[str, Callable] = {"eval": plot_eval, "nll": plot_nll, "advantages": plot_advantages,
                                 "alignment": plot_alignment, "lengths": plot_lengths,
                                 "timings": plot_timings, "loss": plot_loss, "benchmarks": plot_benchmarks}


def plots_for(runs: list[Run]) -> tuple[str, ...]:
    """PLOTS, and the benchmark plot where a run has lm-evaluation-harness scores."""
    return PLOTS + (("benchmarks",) if benchmark_keys(runs) else ())


# ------------------------------------------------------------ report.md
def _fmt(v, digits: int = 3) -> str:
    v = finite(v)
    return "–" if v is None else f"{v:.{digits}f}"


def _above(r: Run, t: int, kind: str) -> bool | None:
    real, gen = r.value(t, f"train/{kind}/real"), r.value(t, f"train/{kind}/generated")
    return None if real is None or gen is None else real > gen


def alignment_verdict(r: Run, t: int) -> str:
    """'yes' when real stays above synthetic on both reward and log-likelihood, else what fails."""
    checks = {"reward": _above(r, t, "rewards"), "log-likelihood": _above(r, t, "logps")}
    if all(v is None for v in checks.values()):
        return "n/a"
    failed = [k for k, v in checks.items() if v is False]
    missing = [k for k, v in checks.items() if v is None]
    if failed:
        return "no (" + ", ".join(f"{k} below" for k in failed) + ")"
    return "yes" + (f" ({', '.join(missing)} n/a)" if missing else "")


TABLE = [  # (header, cell of run r at iteration t)
    ("iter", lambda r, t: "pi0" if t == PI0 else str(t)),
    ("eval EM", lambda r, t: _fmt(r.value(t, "eval/exact_match"))),
    ("eval NLL", lambda r, t: _fmt(r.value(t, "eval/nll"), 4)),
    ("loss", lambda r, t: _fmt(r.value(t, "train/loss"), 4)),
    ("adv cur", lambda r, t: _fmt(r.value(t, "train/advantage/current"))),
    ("adv hist", lambda r, t: _fmt(r.value(t, "train/advantage/historical"))),
    ("margin", lambda r, t: _fmt(r.value(t, "train/rewards/margins"))),
    ("reward real/syn", lambda r, t: _pair(r, t, "rewards")),
    ("logp real/syn", lambda r, t: _pair(r, t, "logps")),
    ("real > syn", lambda r, t: "" if t == PI0 else alignment_verdict(r, t)),
    ("len gen/real", lambda r, t: "/".join(f"{x:.1f}" for x in r.lengths[t]) if t in r.lengths else "–"),
    ("gen s", lambda r, t: _fmt(r.value(t, "timing/generate"), 1)),
    ("train s", lambda r, t: _fmt(r.value(t, "timing/train"), 1)),
    ("eval s", lambda r, t: _fmt(r.value(t, "timing/eval"), 1)),
    ("total s", lambda r, t: _fmt(r.value(t, "timing/iteration"), 1)),
]


def _pair(r: Run, t: int, kind: str) -> str:
    real, gen = r.value(t, f"train/{kind}/real"), r.value(t, f"train/{kind}/generated")
    return "–" if real is None and gen is None else f"{_fmt(real, 2)} / {_fmt(gen, 2)}"


def iteration_table(r: Run) -> list[str]:
    if not r.iterations:
        return ["No iteration rows in metrics.jsonl yet: the run has not evaluated pi_0 or finished an "
                "iteration, so there is no per-iteration table."]
    lines = ["| " + " | ".join(h for h, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for t in r.iterations:
        lines.append("| " + " | ".join(cell(r, t) for _, cell in TABLE) + " |")
    return lines


def benchmark_table(r: Run) -> list[str]:
    keys = benchmark_keys([r])
    if not keys:
        return []
    lines = ["| iter | " + " | ".join(k.removeprefix("eval/lm_eval/") for k in keys) + " |",
             "|" + "---|" * (len(keys) + 1)]
    for t in r.iterations:
        lines.append(f"| {'pi0' if t == PI0 else t} | " + " | ".join(_fmt(r.value(t, k)) for k in keys) + " |")
    return [f"Benchmarks (lm-evaluation-harness, eval.lm_eval), {r.label}:", ""] + lines + [""]


def summary_table(runs: list[Run]) -> list[str]:
    lines = ["| run | objective | iterations completed | status | pi0 eval EM | final eval EM | best eval EM |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        final = r.final("eval/exact_match")
        _, ems = r.series("eval/exact_match")
        planned = f" of {r.planned}" if isinstance(r.planned, int) else ""
        lines.append(f"| `{r.root}` | {r.objective} | {r.completed}{planned} | "
                     f"{'complete' if r.complete else 'incomplete'} | {_fmt(r.value(PI0, 'eval/exact_match'))} | "
                     f"{_fmt(final[1]) + (' (pi0)' if final[0] == PI0 else '') if final else '–'} | "
                     f"{_fmt(max(ems)) if ems else '–'} |")
    return lines


def alignment_text(r: Run) -> list[str]:
    ts = [t for t in r.iterations if t >= 0]
    verdicts = {t: alignment_verdict(r, t) for t in ts}
    if not ts or all(v == "n/a" for v in verdicts.values()):
        return [f"- **{r.label}**: no real/synthetic metrics (objective {r.objective}), nothing to check."]
    held = all(v.startswith("yes") for v in verdicts.values() if v != "n/a")
    out = [f"- **{r.label}**: real stays above synthetic on both reward and log-likelihood in "
           f"{'every' if held else 'not every'} iteration."]
    out += [f"  - iteration {t}: {v}" for t, v in verdicts.items()]
    return out


HEADINGS = {"eval": "Evaluation: exact match", "nll": "Evaluation: NLL of real responses",
            "advantages": "Advantages and reward margins", "alignment": "Alignment: real vs synthetic",
            "lengths": "Response lengths", "timings": "Time per iteration", "loss": "Training loss",
            "benchmarks": "Benchmarks (lm-evaluation-harness)"}
CAPTIONS = {
    "eval": "Greedy exact match on the held-out rows after each iteration (pi0 = the policy before self-play).",
    "nll": "Per-token NLL of the held-out real responses under each policy; lower is better.",
    "advantages": "T-SPIN: mean current advantage (solid) and historical advantage (dashed) per iteration. "
                  "Other objectives: mean reward margin (real minus synthetic).",
    "alignment": "Mean reward and mean log-likelihood of the real (solid) and the synthetic (dashed) "
                 "responses in each iteration's training batches. T-SPIN's claim: real stays above.",
    "lengths": "Mean length in tokens of the responses sampled from pi_t (solid) and of the real "
               "responses (dashed), from the generation shards: a drifting length is a warning sign.",
    "timings": "Wall-clock seconds per iteration. Training streams from generation, so 'generate' is the "
               "time until the last sample (training runs during it) and 'train after generation' the "
               "remainder; 'other' is the rest of timing/iteration.",
    "loss": "Training loss per optimizer step: the SFT stage that made pi_0 (left) and self-play (right, "
            "steps counted across iterations).",
    "benchmarks": "Each lm-evaluation-harness score (task/metric) of every committed checkpoint (eval.lm_eval).",
}


def render_markdown(runs: list[Run], missing: dict[str, str], command: str) -> str:
    title = runs[0].label if len(runs) == 1 else f"comparison of {len(runs)} runs"
    lines = [f"# tspin-ray report: {title}", "",
             f"Made by `{command}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.", ""]
    lines += summary_table(runs) + [""]
    for r in runs:
        lines += [f"## Per-iteration table: {r.label}", ""] + iteration_table(r) + [""] + benchmark_table(r)
        if r.notes:
            lines += [f"Notes on `{r.root}`: " + "; ".join(r.notes) + ".", ""]
    lines += ["EM = exact match; 'real/syn' = real / synthetic response; 'real > syn' = the alignment check "
              "below; 'len gen/real' = mean tokens of pi_t's samples / of the real responses.", ""]
    health = [line for r in runs for line in health_lines(r)]
    if health:
        lines += ["## Health and the best iterate", "", "Likelihood displacement shows as logp y falling while the "
                  "loss falls; a collapsed iterate as NLL / best so far rising and few distinct greedy answers "
                  "(tspin_ray/controller/health.py).", ""] + health
    answers = [line for r in runs for line in answers_table(r)]
    if answers:
        lines += ["## Held-out answers", ""] + answers
    lines += ["## Alignment check (T-SPIN paper)", ""]
    for r in runs:
        lines += alignment_text(r)
    lines += [""]
    for name in plots_for(runs):
        lines += [f"## {HEADINGS[name]}", "", f"![{name}]({name}.png)", "", CAPTIONS[name]]
        if name in missing:
            lines += ["", f"**No data for this plot:** {missing[name]}."]
        lines += [""]
    return "\n".join(lines)


# ------------------------------------------------------------ entry point
def _label_runs(runs: list[Run]) -> None:
    """objective + directory name; parent/name where two runs share a directory name."""
    names = [r.root.name for r in runs]
    for r in runs:
        name = r.root.name if names.count(r.root.name) == 1 else f"{r.root.parent.name}/{r.root.name}"
        r.label = f"{r.objective} ({name})"


def write_report(runs: list[str | Path] | str | Path, out_dir: str | Path | None = None) -> Path:
    """Write PNG plots and report.md for one run, or one comparison of several; return report.md's path.

    Default `out_dir`: `<run>/report` for one run, `<first run>/report-compare` for several.
    Plots: eval.png, nll.png, advantages.png, alignment.png, lengths.png, timings.png, loss.png (one line
    per run). A plot without data says "no data" and report.md notes it; nothing here needs Ray.
    """
    if isinstance(runs, (str, Path)):
        runs = [runs]
    if not runs:
        raise UserError("report needs at least one run directory")
    loaded = [load_run(p) for p in runs]
    _label_runs(loaded)
    default = loaded[0].root / ("report" if len(loaded) == 1 else "report-compare")
    out = Path(out_dir) if out_dir is not None else default
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the report folder {out}: {e.strerror or e}") from None
    colors = _colors(loaded)
    missing = {}
    for name in plots_for(loaded):
        why = PLOTTERS[name](loaded, colors, out / f"{name}.png")
        if why:
            missing[name] = why
    command = "tspin-ray report " + " ".join(f"--run {p}" for p in runs)
    path = out / "report.md"
    write_atomic(path, render_markdown(loaded, missing, command).encode())
    return path
