"""Diagnostics that measure what the normalization papers plot, as hooks that work on normlab's models and on
Hugging Face models: angular distance between layers (D1), layer removal (D2), gradient norms (D3), hidden-state
variance growth (D4), massive activations (D5), attention entropy (D6) and the batch-statistic fluctuation of
batch-dependent norms (PowerNorm, https://arxiv.org/abs/2003.07845). D1-D6 is normlab's numbering; each module names
the papers (and figures) whose definition it follows.

>>> rows = collect(model, batch, metrics=["angular_distance", "attention_entropy"])  # doctest: +SKIP
>>> plot_per_layer(rows, "angular_distance", "d1.png")  # doctest: +SKIP
"""

from __future__ import annotations

from normlab.diagnostics._capture import find_layers
from normlab.diagnostics.attention import AttentionEntropy, attention_probs, entropy_per_query
from normlab.diagnostics.batch_stats import BatchStatMonitor
from normlab.diagnostics.collect import DEFAULT_METRICS, METRICS, collect
from normlab.diagnostics.gradients import activation_grad_rows, gradient_rows, layer_skip_rows, param_grad_rows
from normlab.diagnostics.plot import per_layer_series, plot_per_layer
from normlab.diagnostics.representation import REPRESENTATION_METRICS, RepresentationStats, angular_distance

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "REPRESENTATION_METRICS",
    "AttentionEntropy",
    "BatchStatMonitor",
    "RepresentationStats",
    "activation_grad_rows",
    "angular_distance",
    "attention_probs",
    "collect",
    "entropy_per_query",
    "find_layers",
    "gradient_rows",
    "layer_skip_rows",
    "param_grad_rows",
    "per_layer_series",
    "plot_per_layer",
]
