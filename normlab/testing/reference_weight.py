"""Float64 references for the weight-side methods of :mod:`normlab.weight`, written as plain per-unit loops over
Python floats so they share no code with the vectorised implementations they check."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["agc", "scaled_standardize", "standardize", "standardize_linear_outputs"]


def _rows(w: Tensor) -> list[list[float]]:
    return w.detach().to(torch.float64).reshape(w.shape[0], -1).tolist()


def standardize(w: Tensor, eps: float, unbiased: bool, eps_inside: bool) -> Tensor:
    """WS per output row: ``(w - mean) / (std + eps)`` or ``/ sqrt(var + eps)``."""
    out = []
    for row in _rows(w):
        n = len(row)
        mean = sum(row) / n
        ss = sum((v - mean) ** 2 for v in row)
        var = ss / (n - 1 if unbiased else n)
        denom = math.sqrt(var + eps) if eps_inside else math.sqrt(var) + eps
        out.append([(v - mean) / denom for v in row])
    return torch.tensor(out, dtype=torch.float64).reshape(w.shape)


def scaled_standardize(w: Tensor, gain: list[float], eps: float, variant: str, gamma: float) -> Tensor:
    """Scaled WS per output row (DeepMind: ``max(N var, eps)``; timm: ``N^-1/2 / sqrt(var + eps)``)."""
    out = []
    for row, g in zip(_rows(w), gain):
        n = len(row)
        mean = sum(row) / n
        var = sum((v - mean) ** 2 for v in row) / n
        if variant == "deepmind":
            scale = 1.0 / math.sqrt(max(n * var, eps))
        else:
            scale = 1.0 / math.sqrt(var + eps) / math.sqrt(n)
        out.append([g * gamma * (v - mean) * scale for v in row])
    return torch.tensor(out, dtype=torch.float64).reshape(w.shape)


def agc(w: Tensor, g: Tensor, clipping: float, eps: float, unit_dim: int | None) -> Tensor:
    """AGC of gradient ``g`` for parameter ``w``: units are slices along ``unit_dim`` (``None``: whole tensor)."""
    w64, g64 = w.detach().to(torch.float64), g.detach().to(torch.float64).clone()
    units = [slice(None)] if unit_dim is None else list(range(w64.shape[unit_dim]))
    for i in units:
        idx = (slice(None),) * (unit_dim or 0) + (i,) if unit_dim is not None else (slice(None),)
        wn = math.sqrt(sum(v * v for v in w64[idx].reshape(-1).tolist()))
        gn = math.sqrt(sum(v * v for v in g64[idx].reshape(-1).tolist()))
        max_norm = clipping * max(wn, eps)
        if gn > max_norm:
            g64[idx] = g64[idx] * (max_norm / max(gn, 1e-6))
    return g64


def standardize_linear_outputs(y: Tensor) -> tuple[list[float], list[float]]:
    """Per-column mean and biased std of a 2-D ``(N, O)`` tensor, as Python floats."""
    cols = y.detach().to(torch.float64).t().tolist()
    means = [sum(c) / len(c) for c in cols]
    stds = [math.sqrt(sum((v - m) ** 2 for v in c) / len(c)) for c, m in zip(cols, means)]
    return means, stds
