"""PNG plots of a run (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, path: Path) -> str:
    """Add the legend, write `fig` to `path` and close it; returns the file name."""
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path).name


def lines(
    path: Path,
    x: list,
    series: dict[str, list[float]],
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> str:
    """One line per series over the same x values; returns the file name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ys in series.items():
        ax.plot(x, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return _save(plt, fig, ax, path)


def cdfs(path: Path, series: dict[str, list[float]], xlabel: str, title: str, logx: bool = False) -> str:
    """Empirical CDF per series; returns the file name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in series.items():
        ordered = sorted(values)
        if ordered:
            ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
            ax.step(ordered, ys, where="post", label=f"{label} (n={len(ordered)})")
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="fraction of requests", title=title)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    return _save(plt, fig, ax, path)


def bars(path: Path, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> str:
    """Grouped bars: one group per entry of `groups`, one bar per series; returns the file name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(series), 1)
    for i, (label, ys) in enumerate(series.items()):
        ax.bar([g + i * width for g in range(len(groups))], ys, width, label=label)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, ax, path)
