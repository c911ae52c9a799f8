"""Residual-stream diagnostics from block inputs and outputs: angular distance between layers (D1), hidden-state
variance and RMS growth with depth (D4) with the branch-to-stream update ratio, and massive activations / max
magnitude (D5).

Papers: Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers" (https://arxiv.org/abs/2403.17887) and
ShortGPT (https://arxiv.org/abs/2403.03853) for D1; Mix-LN (https://arxiv.org/abs/2412.13795) and LayerNorm Scaling
(https://arxiv.org/abs/2502.05795) for D1/D4; Peri-LN (https://arxiv.org/abs/2502.02732) for D4/D5; Sun et al.,
"Massive Activations in Large Language Models" (https://arxiv.org/abs/2402.17762) for D5.

Every statistic counts valid (non-padding) tokens only and is pooled over batches, so a padded batch gives the same
numbers as its sequences run one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from normlab.diagnostics._capture import MeanAcc, Moments, Row

__all__ = ["REPRESENTATION_METRICS", "RepresentationStats", "angular_distance"]

REPRESENTATION_METRICS = ("angular_distance", "hidden_variance", "hidden_rms", "update_ratio", "massive_activations",
                          "max_abs")


def angular_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-token angular distance ``arccos(cos(a, b)) / π`` in ``[0, 1]`` over the last axis, in float64.

    A cosine that is undefined (a zero vector) counts as 0.5, as in the ShortGPT / Mix-LN analysis scripts.

    >>> float(angular_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])))
    0.5
    """
    a64, b64 = a.double(), b.double()
    cos = (a64 * b64).sum(-1) / (a64.norm(dim=-1) * b64.norm(dim=-1))
    dist = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
    return torch.where(torch.isnan(cos), torch.full_like(dist, 0.5), dist)


def _last_valid(mask: Tensor) -> Tensor:
    """Index of the last valid token of each sequence (works for left and right padding)."""
    n = mask.shape[1]
    pos = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.where(mask, pos, torch.full_like(pos, -1)).max(dim=1).values


class RepresentationStats:
    """Accumulates D1/D4/D5 statistics over batches; :meth:`rows` gives one tidy row per layer and variant.

    Layer indices: ``layer`` ℓ = 1..L for a block's angular distance and update ratio (block ℓ's input ``x_ℓ``
    against ``x_{ℓ+gap}``); ``layer`` 0..L for the per-layer hidden-state statistics (0 = the embedding output, the
    input of block 1; ℓ = the output of block ℓ, before any final norm).

    Metrics and variants:

    - ``angular_distance`` (D1), key ``gap``: ``last_token`` (last valid token of each sequence, mean over
      sequences, ShortGPT's choice with the pad pitfall fixed) and ``all_tokens`` (mean over valid tokens).
    - ``hidden_variance`` (D4): ``all_elements`` (variance of every valid element) and ``per_token`` (mean over
      tokens of the variance across channels).
    - ``hidden_rms`` (D4): ``sqrt(mean(x²))`` over valid elements.
    - ``update_ratio`` (D4 companion): mean over valid tokens of ``‖x_{ℓ+1} − x_ℓ‖ / ‖x_ℓ‖``.
    - ``massive_activations`` (D5): per sequence over its valid tokens × channels, the ``top1..top{k}``
      magnitudes, the (lower) ``median`` magnitude and ``top1_to_median``; each averaged over sequences.
    - ``max_abs`` (D5, Peri-LN's FP16 headroom): the largest ``|x|`` over everything seen.

    Args:
        metrics: which of :data:`REPRESENTATION_METRICS` to compute.
        max_gap: largest ``n`` of the D1 distance ``d(x_ℓ, x_{ℓ+n})`` (1 = input vs output of each block).
        top_k: how many of the largest magnitudes to report for D5.
    """

    def __init__(self, metrics: Sequence[str] = REPRESENTATION_METRICS, *, max_gap: int = 1, top_k: int = 3) -> None:
        unknown = [m for m in metrics if m not in REPRESENTATION_METRICS]
        if unknown:
            raise ValueError(
                f"RepresentationStats: unknown metrics {unknown}; expected some of {REPRESENTATION_METRICS}"
            )
        for name, value in (("max_gap", max_gap), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RepresentationStats: expected {name} to be an int >= 1, got {value!r}")
        self.metrics = tuple(metrics)
        self.max_gap = max_gap
        self.top_k = top_k
        self._means = MeanAcc()
        self._moments: dict[int, Moments] = {}
        self._max: dict[int, float] = {}

    def update(self, inputs: Sequence[Tensor], outputs: Sequence[Tensor], mask: Tensor) -> None:
        """Add one batch. ``inputs[i]`` / ``outputs[i]``: block ``i + 1``'s input and output ``(B, N, d)``;
        ``mask``: bool ``(B, N)`` valid tokens."""
        if len(inputs) != len(outputs) or not inputs:
            raise ValueError(
                f"RepresentationStats: expected as many block inputs as outputs (>= 1), got {len(inputs)} and "
                f"{len(outputs)}"
            )
        for t in (*inputs, *outputs):
            if t.dim() != 3 or tuple(t.shape[:2]) != tuple(mask.shape):
                raise ValueError(
                    f"RepresentationStats: expected hidden states of size [B, N, d] with [B, N] = {list(mask.shape)}, "
                    f"got {list(t.shape)}"
                )
        mask = mask.bool()
        n_layers = len(inputs)
        if "angular_distance" in self.metrics:
            last = _last_valid(mask)
            has = last >= 0
            rows_idx = torch.arange(mask.shape[0], device=mask.device)[has]
            for ell in range(1, n_layers + 1):
                for gap in range(1, self.max_gap + 1):
                    if ell + gap - 1 > n_layers:
                        break
                    d = angular_distance(inputs[ell - 1], outputs[ell + gap - 2])
                    key = ("angular_distance", ell, gap)
                    self._means.add((*key, "all_tokens"), float(d[mask].sum()), float(mask.sum()))
                    self._means.add((*key, "last_token"), float(d[rows_idx, last[has]].sum()), float(has.sum()))
        if "update_ratio" in self.metrics:
            for ell in range(1, n_layers + 1):
                x, y = inputs[ell - 1].double(), outputs[ell - 1].double()
                r = (y - x).norm(dim=-1) / x.norm(dim=-1)
                self._means.add(("update_ratio", ell, None, None), float(r[mask].sum()), float(mask.sum()))
        states = [inputs[0], *outputs]
        for ell, h in enumerate(states):
            self._update_layer(ell, h, mask)

    def _update_layer(self, ell: int, h: Tensor, mask: Tensor) -> None:
        valid = h.detach().double()[mask]  # (n_valid, d)
        if "hidden_variance" in self.metrics:
            self._moments.setdefault(ell, Moments()).add(valid)
            per_token = valid.var(dim=-1, unbiased=False)
            self._means.add(("hidden_variance", ell, None, "per_token"), float(per_token.sum()), float(valid.shape[0]))
        if "hidden_rms" in self.metrics:
            self._means.add(("hidden_rms", ell, None, None), float(valid.square().sum()), float(valid.numel()))
        if "max_abs" in self.metrics and valid.numel():
            self._max[ell] = max(self._max.get(ell, -math.inf), float(valid.abs().max()))
        if "massive_activations" in self.metrics:
            mag = h.detach().double().abs()
            for b in range(h.shape[0]):
                seq = mag[b][mask[b]].reshape(-1)
                if seq.numel() == 0:
                    continue
                k = min(self.top_k, seq.numel())
                top = torch.topk(seq, k).values
                med = float(seq.median())
                for j in range(k):
                    self._means.add(("massive_activations", ell, None, f"top{j + 1}"), float(top[j]), 1.0)
                self._means.add(("massive_activations", ell, None, "median"), med, 1.0)
                ratio = float(top[0]) / med if med > 0 else math.inf
                self._means.add(("massive_activations", ell, None, "top1_to_median"), ratio, 1.0)

    def rows(self) -> list[Row]:
        """The accumulated statistics as tidy rows (``metric``, ``layer``, ``value``, optional ``variant``/``gap``,
        ``count`` = how many tokens / sequences / elements were pooled)."""
        out: list[Row] = []
        for (metric, layer, gap, variant), value, count in self._means.items():
            if metric == "hidden_rms":
                value = math.sqrt(value)
            row: Row = {"metric": metric, "layer": layer, "value": value, "count": count}
            if variant is not None:
                row["variant"] = variant
            if gap is not None:
                row["gap"] = gap
            out.append(row)
        for layer, mom in self._moments.items():
            out.append({"metric": "hidden_variance", "layer": layer, "value": mom.variance, "count": mom.n,
                        "variant": "all_elements"})
        for layer, value in self._max.items():
            out.append({"metric": "max_abs", "layer": layer, "value": value})
        return sorted(out, key=lambda r: (r["metric"], str(r.get("variant")), r.get("gap", 0), r["layer"]))
