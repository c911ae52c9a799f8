"""Float64 references of LIN and AdaLIN (U-GAT-IT, https://arxiv.org/abs/1907.10830, Eq. 5-6), from the
definitions with explicit sums, independently of :mod:`normlab.functional.lin`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.registry import register_reference
from normlab.testing.reference_evo_norm import channel_affine, cvec

__all__ = ["ada_lin", "lin", "lin_mix"]


def _normalise(x: Tensor, dims: tuple[int, ...], unbiased: bool, eps: float) -> Tensor:
    count = 1
    for d in dims:
        count *= x.shape[d]
    mean = x.sum(dims, keepdim=True) / count
    var = ((x - mean) ** 2).sum(dims, keepdim=True) / (count - 1 if unbiased else count)
    return (x - mean) / torch.sqrt(var + eps)


def lin_mix(m: Any, x: Tensor) -> Tensor:
    """``ρ·x̂_I + (1 − ρ)·x̂_L`` with the module's ``ρ`` (smoothed as ``clip(ρ − 0.1, 0, 1)`` when it smooths)."""
    x = x.to(torch.float64)
    spatial = tuple(range(2, x.dim()))
    rho = cvec(m.rho, x.dim())
    if getattr(m, "smoothing", False):
        rho = torch.clamp(rho - 0.1, 0.0, 1.0)
    x_i = _normalise(x, spatial, m.unbiased, m.eps)
    x_l = _normalise(x, (1, *spatial), m.unbiased, m.eps)
    return rho * x_i + (1 - rho) * x_l


@register_reference("lin")
def lin(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    return channel_affine(lin_mix(m, x), m)


@register_reference("ada_lin")
def ada_lin(
    m: Any, x: Tensor, mask: Tensor | None = None, gamma: Tensor | None = None, beta: Tensor | None = None
) -> Tensor:
    """AdaLIN with optional ``gamma``/``beta`` of shape ``(N, C)``."""
    y = lin_mix(m, x)
    if gamma is not None:
        y = y * gamma.detach().double().reshape(-1, y.shape[1], *[1] * (y.dim() - 2))
    if beta is not None:
        y = y + beta.detach().double().reshape(-1, y.shape[1], *[1] * (y.dim() - 2))
    return y
