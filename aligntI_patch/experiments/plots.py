"""One PNG per grid (matplotlib, Agg): grouped bars per family, or curves over the grid's axis.

Bars: one group per family and overall, one bar per row of the grid, error bars the 95 % t interval, the
teacher a black tick. Curves (grids whose rows carry series and x: budget, data fraction, TPA's d): one panel
per family and overall, one line per series, the teacher a dashed line. `band_plot`: mean curves with their
95 % t bands over seeds (Fig. 7 and Fig. 4 over seeds).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aligntI_patch.experiments.report import Group
    from aligntI_patch.experiments.stats import Estimate


def band_plot(path: Path, curves: dict[str, tuple[list[float], list[Estimate]]], x_label: str, y_label: str,
              title: str, decorate: Callable | None = None, marker: str | None = None) -> None:
    """One line per curve ({label: (x, an Estimate per x)}) with its 95 % t band where every point has one;
    `decorate(ax)` adds what a figure needs besides (reference lines, axis scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, (xs, curve) in curves.items():
        line, = ax.plot(xs, [e.mean for e in curve], marker=marker, label=label)
        if all(e.half is not None for e in curve):
            ax.fill_between(xs, [e.mean - e.half for e in curve], [e.mean + e.half for e in curve],
                            color=line.get_color(), alpha=0.15)
    if decorate is not None:
        decorate(ax)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _stats(group: Group, column: str) -> tuple[float, float]:
    e = group.estimate(column)
    if e is None:
        return float("nan"), 0.0
    return e.mean, e.half or 0.0


def _bars(ax, groups: list[Group], teacher: dict, columns: list[str]) -> None:
    width = 0.8 / max(1, len(groups))
    for i, g in enumerate(groups):
        stats = [_stats(g, c) for c in columns]
        xs = [k + (i - (len(groups) - 1) / 2) * width for k in range(len(columns))]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[h for _, h in stats], capsize=2, label=g.label)
    ks = [k for k, c in enumerate(columns) if c in teacher]
    ax.scatter(ks, [teacher[columns[k]] for k in ks], marker="_", s=400, color="black", label="teacher", zorder=3)
    ax.set_xticks(range(len(columns)), columns, rotation=30)
    ax.set_ylabel("accuracy %")
    ax.legend(fontsize=6, ncol=2)


def _curves(fig, groups: list[Group], teacher: dict, columns: list[str], x_label: str) -> None:
    ncols = 4
    nrows = (len(columns) + ncols - 1) // ncols
    series = sorted({g.series for g in groups})
    for k, column in enumerate(columns):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for s in series:
            points = sorted((g.x, *_stats(g, column)) for g in groups if g.series == s)
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=2, label=s)
        if column in teacher:
            ax.axhline(teacher[column], color="black", linestyle="--", linewidth=1, label="teacher")
        ax.set_title(column, fontsize=9)
        ax.set_xlabel(x_label, fontsize=7)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=6)


def plot_grid(manifest: dict, groups: list[Group], teacher: dict, columns: list[str], path: Path) -> bool:
    """Write the grid's PNG to `path`; False (nothing written) when no row has a value yet."""
    groups = [g for g in groups if g.values]
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = manifest.get("x_label") and all(g.series is not None and g.x is not None for g in groups)
    fig = plt.figure(figsize=(12, 6) if curves else (max(8, len(columns) * len(groups) * 0.25), 4.5))
    if curves:
        _curves(fig, groups, teacher, columns, manifest["x_label"])
    else:
        _bars(fig.add_subplot(1, 1, 1), groups, teacher, columns)
    fig.suptitle(f"{manifest['grid']}: {manifest['paper']}; {manifest['split']} split, mean ± 95 % t interval")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
