"""Per-layer curves of diagnostic rows (the layer-wise figures of Mix-LN, https://arxiv.org/abs/2412.13795, LayerNorm
Scaling, https://arxiv.org/abs/2502.05795, and Peri-LN, https://arxiv.org/abs/2502.02732). Needs matplotlib
(``pip install 'normlab[plot]'``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["per_layer_series", "plot_per_layer"]

_NON_GROUP = ("metric", "layer", "value", "count", "step", "loss", "base_loss")


def per_layer_series(rows: Iterable[Mapping[str, Any]], metric: str) -> dict[str, list[tuple[int, float]]]:
    """Curves ``{label: [(layer, value), ...]}`` for one metric.

    Rows are grouped by every key other than ``layer``/``value``/``count``/``step`` (``variant``, ``gap``,
    ``module``...); repeated ``(group, layer)`` entries (several steps) are averaged. Per-head rows are left out when
    head-averaged rows of the same metric exist. Rows without an integer layer are skipped.
    """
    selected = [r for r in rows if r.get("metric") == metric and isinstance(r.get("layer"), int)]
    if any("head" not in r for r in selected):
        selected = [r for r in selected if "head" not in r]
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in selected:
        label = ", ".join(f"{k}={r[k]}" for k in sorted(r) if k not in _NON_GROUP) or metric
        acc[label][int(r["layer"])].append(float(r["value"]))
    return {label: sorted((layer, sum(v) / len(v)) for layer, v in by_layer.items()) for label, by_layer in acc.items()}


def plot_per_layer(
    rows: Iterable[Mapping[str, Any]], metric: str, path: str | Path, *, logy: bool = False, title: str | None = None
) -> Path:
    """Draw one curve per variant of ``metric`` against the layer index and save it to ``path`` (PNG, SVG, PDF...).

    Args:
        rows: diagnostic rows (e.g. from :func:`~normlab.diagnostics.collect`).
        metric: the metric to draw.
        path: output file.
        logy: logarithmic y-axis (D4 variance growth is near-exponential).
        title: figure title (default: the metric).

    Returns:
        The path written.

    Raises:
        ValueError: no row of ``metric`` has an integer layer.
        ImportError: matplotlib is missing.
    """
    series = per_layer_series(rows, metric)
    if not series:
        raise ValueError(f"plot_per_layer: no rows with metric={metric!r} and an integer layer")
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plot_per_layer needs matplotlib: pip install 'normlab[plot]'") from err
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for label, points in sorted(series.items()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel("layer")
        ax.set_ylabel(metric)
        ax.set_title(title or metric)
        if logy:
            ax.set_yscale("log")
        if len(series) > 1:
            ax.legend(fontsize="small")
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out
