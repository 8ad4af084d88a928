"""PNG plots for run reports: accuracy vs MACs, and per-layer widths before/after.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so writing a report never
changes the user's matplotlib backend nor leaves figures open. Each function returns the written
path, or None when there is nothing to draw (e.g. no accuracy was recorded).

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "w.png"
>>> plot_layer_widths(out, ["conv1", "conv2"], [64, 128], [32, 64]) == out
True
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .tables import as_fraction, fmt_count

Point = tuple[float, float]  # (MACs, accuracy as fraction or percent)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, ax: Any, path: str | Path, title: str | None) -> Path:
    """Legend, the title (as text), and the figure written to `path`."""
    ax.legend(loc="best")
    if title:
        ax.set_title(_text(title))
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def _text(name: str) -> str:
    """A user's name (layer, arm, recipe) as plain text: matplotlib reads "$...$" as math."""
    return name.replace("$", r"\$")


def _valid(point: Point | None) -> bool:
    return point is not None and point[0] is not None and as_fraction(point[1]) is not None


def plot_accuracy_vs_macs(path: str | Path, before: Point | None = None, after: Point | None = None,
                          no_finetune: Point | None = None, history: Sequence[Point] = (),
                          title: str | None = None) -> Path | None:
    """Scatter of accuracy (%) against MACs: before, after, pruned-without-fine-tuning and the
    intermediate steps of `history` joined by a line in order. None if no point is complete.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.png"
    >>> plot_accuracy_vs_macs(p, before=(4e8, 0.93), after=(1e8, 0.92)) == p
    True
    >>> plot_accuracy_vs_macs(p, before=(4e8, None)) is None
    True
    """
    steps = [pt for pt in history if _valid(pt)]
    marked = [(before, "before", "o", "tab:blue"), (no_finetune, "pruned, no fine-tune", "x", "tab:red"),
              (after, "after", "s", "tab:green")]
    marked = [m for m in marked if _valid(m[0])]
    if not steps and not marked:
        return None
    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    if steps:
        ax.plot([p[0] for p in steps], [100 * as_fraction(p[1]) for p in steps], "-.", color="gray",
                marker=".", label="steps")
    for (macs, acc), label, marker, color in marked:
        ax.scatter([macs], [100 * as_fraction(acc)], marker=marker, color=color, s=60, label=label, zorder=3)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_count(v)))
    ax.set_xlabel("MACs")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    return _finish(fig, ax, path, title)


MAX_BARS = 2000  # layers in the widths plot; the report's table still lists every layer


def plot_layer_widths(path: str | Path, names: Sequence[str], before: Sequence[float | None],
                      after: Sequence[float | None], title: str | None = None) -> Path | None:
    """Horizontal bars of each layer's channel count before and after pruning (first layer on
    top). Layers with a missing count draw no bar; None if no layer has any count, or more than
    MAX_BARS layers have one.
    """
    rows = [(n, b, a) for n, b, a in zip(names, before, after) if b is not None or a is not None]
    if not rows or len(rows) > MAX_BARS:  # more bars than any page shows legibly (and minutes to draw)
        return None
    n = len(rows)
    # ~0.28 inch per layer keeps labels legible; the cap keeps huge nets under ~5000 px tall.
    fig = _new_figure(7.5, min(max(2.5, 0.28 * n + 1.2), 50.0))
    ax = fig.add_subplot()
    ys = list(range(n))
    bar = 0.4
    ax.barh([y - bar / 2 for y in ys], [b or 0 for _, b, _ in rows], height=bar, label="before", color="tab:blue")
    ax.barh([y + bar / 2 for y in ys], [a or 0 for _, _, a in rows], height=bar, label="after", color="tab:orange")
    ax.set_yticks(ys)
    # A "$" in a layer name would switch matplotlib to math text; show it literally.
    ax.set_yticklabels([_text(name) for name, _, _ in rows], fontsize=8 if n <= 40 else 6)
    ax.invert_yaxis()
    ax.set_xlabel("channels")
    ax.grid(True, axis="x", alpha=0.3)
    return _finish(fig, ax, path, title)


def plot_pareto(path: str | Path, points: dict[str, tuple[float, float, float | None]], front: Sequence[str] = (),
                title: str | None = None) -> Path | None:
    """Accuracy (%) against MACs for named arms, each (MACs, mean accuracy, std or None) drawn with
    its spread as an error bar; the arms in `front` (the Pareto front) are joined by a line and
    drawn filled. None when no arm has both numbers.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "pareto.png"
    >>> plot_pareto(p, {"dense": (4e7, 0.9, None), "l2": (2e7, 0.88, 0.004)}, ["dense", "l2"]) == p
    True
    """
    pts = {n: v for n, v in points.items() if v[0] is not None and as_fraction(v[1]) is not None}
    if not pts:
        return None
    fig = _new_figure(6.8, 4.4)
    ax = fig.add_subplot()
    for name, (macs, acc, std) in pts.items():
        on_front = name in front
        ax.errorbar([macs], [100 * as_fraction(acc)], yerr=None if std is None else [100 * std], fmt="o",
                    mfc="tab:green" if on_front else "white", mec="tab:green" if on_front else "tab:gray",
                    ecolor="tab:gray", capsize=3, zorder=3)
        ax.annotate(_text(name), (macs, 100 * as_fraction(acc)), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    line = [pts[n] for n in front if n in pts]
    if len(line) > 1:
        ax.plot([p[0] for p in line], [100 * as_fraction(p[1]) for p in line], "-", color="tab:green",
                alpha=0.6, label="Pareto front")
        ax.legend(loc="lower right")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_count(v)))
    ax.set_xlabel("MACs per image")
    ax.set_ylabel("accuracy (%), mean ± std over seeds")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(_text(title), fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def plot_alpha_history(path: str | Path, epochs: Sequence[str], mass: dict[str, Sequence[Sequence[float]]],
                       ops: Sequence[str]) -> Path | None:
    """Per-epoch softmax mass of each op (mean over edges), one panel per cell type.

    `mass[cell][e][k]` is op k's mean weight at epoch label `epochs[e]`.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "a.png"
    >>> plot_alpha_history(out, ["1", "2"], {"normal": [[0.5, 0.5], [0.3, 0.7]]}, ["a", "b"]) == out
    True
    """
    if not epochs or not mass:
        return None
    fig = _new_figure(4.2 * len(mass), 3.2)
    axes = fig.subplots(1, len(mass), squeeze=False)[0]
    for ax, (cell, rows) in zip(axes, mass.items()):
        for k, op in enumerate(ops):
            ax.plot(range(len(epochs)), [r[k] for r in rows], label=op, linestyle="--" if k < 4 else "-")
        ax.set_title(f"{cell} cell: softmax(alpha), mean over edges")
        ax.set_xlabel("epoch (all phases)")
        ax.set_ylabel("weight")
    axes[-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=110)
    return Path(path)
