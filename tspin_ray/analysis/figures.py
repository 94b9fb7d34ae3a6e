"""Matplotlib figures for reports and studies: one look, a legend that never covers a curve, atomic saves."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from tspin_ray.analysis.run_reader import PI0


def figure(width: float, height: float) -> Figure:
    # constrained layout makes room for the legend below the axes, so it never covers a curve
    return Figure(figsize=(width, height), layout="constrained")


def iteration_axis(ax, xlabel: str) -> None:
    """Integer ticks with -1 written as pi0: readers should not have to know the -1 convention."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: "pi0" if round(x) == PI0 else f"{round(x)}"))
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)


def save_figure(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110)
