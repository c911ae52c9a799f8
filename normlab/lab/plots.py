"""PNG plots of a lab run (matplotlib, imported here only): loss curves with a band over seeds, throughput,
per-layer diagnostics. Every function is deterministic in its inputs, so a report re-renders byte-identically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_curves", "plot_per_layer_arms", "plot_throughput"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib; install it with: pip install 'normlab[plot]'") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "normlab"
    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)


def _finish_lines(fig: Any, ax: Any, path: Path, *, xlabel: str, ylabel: str, title: str, log_y: bool,
                  legend_size: int) -> None:
    """Labels, the optional log scale, grid and legend of a line plot, then :func:`_save`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def plot_curves(
    series: dict[str, dict[int, list[float]]],
    path: Path,
    *,
    title: str,
    ylabel: str,
    log_y: bool = False,
    clip_to_start: bool = True,
) -> None:
    """One line per arm: the mean over seeds at each step, a band from the min to the max seed.

    Args:
        series: ``{arm: {step: [value per seed]}}``; NaN values (a diverged seed) are left out of the mean.
        path: output PNG.
        clip_to_start: cap the y axis at 1.05 × the median over arms of their first plotted mean, so that one
            blown-up arm does not flatten the others (its curve leaves the top of the plot).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    firsts = []
    lows = []
    for i, (arm, by_step) in enumerate(series.items()):
        steps = sorted(by_step)
        vals = [np.asarray(by_step[s], dtype=float) for s in steps]
        keep = [j for j, v in enumerate(vals) if np.isfinite(v).any()]
        if not keep:
            continue
        xs = np.array([steps[j] for j in keep])
        mean = np.array([np.nanmean(vals[j]) for j in keep])
        lo = np.array([np.nanmin(vals[j]) for j in keep])
        hi = np.array([np.nanmax(vals[j]) for j in keep])
        color = f"C{i % 10}"
        ax.plot(xs, mean, color=color, label=arm, linewidth=1.6)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.18, linewidth=0)
        firsts.append(float(mean[0]))
        lows.append(float(np.min(lo)))
    if clip_to_start and firsts and not log_y:
        top = 1.05 * float(np.median(firsts))
        bottom = min(lows)
        if math.isfinite(top) and math.isfinite(bottom) and top > bottom:
            ax.set_ylim(bottom - 0.02 * (top - bottom), top)
    _finish_lines(fig, ax, path, xlabel="step", ylabel=ylabel, title=title, log_y=log_y, legend_size=8)


def plot_throughput(values: Mapping[str, Sequence[float]], path: Path, *, unit: str) -> None:
    """Median throughput per arm, with a p20–p80 error bar."""
    plt = _pyplot()
    arms = [a for a, v in values.items() if len(v)]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * max(3, len(arms)) + 1.0))
    p20 = [float(np.percentile(values[a], 20)) for a in arms]
    p50 = [float(np.percentile(values[a], 50)) for a in arms]
    p80 = [float(np.percentile(values[a], 80)) for a in arms]
    y = np.arange(len(arms))
    ax.barh(y, p50, xerr=[np.subtract(p50, p20), np.subtract(p80, p50)], color=[f"C{i % 10}" for i in range(len(arms))])
    ax.set_yticks(y, arms)
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} (p50, bar p20-p80 over eval intervals and seeds)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_per_layer_arms(
    data: dict[str, dict[int, dict[int, float]]], path: Path, *, metric: str, log_y: bool = False
) -> None:
    """A per-layer diagnostic: one line per arm at its last recorded step (solid) and first step (dotted).

    Args:
        data: ``{arm: {step: {layer: mean over seeds}}}``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (arm, by_step) in enumerate(data.items()):
        if not by_step:
            continue
        color = f"C{i % 10}"
        steps = sorted(by_step)
        for step, style in ((steps[0], ":"), (steps[-1], "-")):
            if style == ":" and len(steps) == 1:
                continue
            layers = sorted(by_step[step])
            label = f"{arm} (step {step})"
            ax.plot(layers, [by_step[step][ell] for ell in layers], style, color=color, marker="o", markersize=3,
                    label=label, linewidth=1.4)
    _finish_lines(fig, ax, path, xlabel="layer (0 = embedding output)", ylabel=metric,
                  title=f"{metric} per layer, mean over seeds", log_y=log_y, legend_size=7)
