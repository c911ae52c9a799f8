"""Float64 reference of Region Normalization (https://arxiv.org/abs/1911.10375). The batch statistics follow the
released code's recipe literally - fill the other region with the region's mean, BatchNorm with batch statistics,
rescale by ``sqrt(|region|/NHW)`` - and the instance statistics the paper's formula, region by region and sample by
sample, independently of :mod:`normlab.functional.region_norm`'s closed form."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab.registry import register_reference

__all__ = ["region_norm", "region_normalise"]


def _official_rn(region: Tensor, mask: Tensor, eps: float) -> Tensor:
    """The official ``rn(region, mask)``, ``region = x·mask``."""
    n, _, h, w = region.shape
    total = region.sum((0, 2, 3))
    size = mask.expand_as(region).sum((0, 2, 3))
    size = torch.where(size == 0, torch.ones_like(size), size)
    mu = (total / size).reshape(1, -1, 1, 1)
    filled = region + (1 - mask) * mu
    m = filled.mean((0, 2, 3), keepdim=True)
    v = ((filled - m) ** 2).mean((0, 2, 3), keepdim=True)
    return (filled - m) / torch.sqrt(v + eps) * torch.sqrt(size / (n * h * w)).reshape(1, -1, 1, 1)


def _instance_rn(x: Tensor, mask: Tensor, eps: float) -> Tensor:
    out = torch.zeros_like(x)
    full = mask.expand_as(x)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            sel = full[i, c] > 0.5
            if sel.any():
                vals = x[i, c][sel]
                mu = vals.mean()
                var = ((vals - mu) ** 2).mean()
                out[i, c][sel] = (vals - mu) / torch.sqrt(var + eps)
    return out


def region_normalise(m: Any, x: Tensor, mask: Tensor) -> Tensor:
    """``x̂`` for a binary float64 ``mask`` ``(N, 1 or C, H, W)`` (1 = region one)."""
    if m.statistics == "batch":
        return _official_rn(x * mask, mask, m.eps) + _official_rn(x * (1 - mask), 1 - mask, m.eps)
    return _instance_rn(x, mask, m.eps) + _instance_rn(x, 1 - mask, m.eps)


def _p(t: Tensor | None) -> Tensor:
    """A parameter the reference needs, as float64 (the module of that variant always has it)."""
    assert t is not None, "region_norm reference: a parameter of this variant is missing"
    return t.detach().double()


def _opt(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().double()


@register_reference("region_norm")
def region_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    x = x.to(torch.float64)
    n, _, h, w = x.shape
    pad = m.kernel_size // 2
    if m.learnable:
        pooled = torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True).values], dim=1)
        s = torch.sigmoid(F.conv2d(pooled, _p(m.sa_weight), padding=pad))
        region = (s >= m.threshold).double()
        gamma = F.conv2d(s, _p(m.gamma_weight), _opt(m.gamma_bias), padding=pad)
        beta = F.conv2d(s, _p(m.beta_weight), _opt(m.beta_bias), padding=pad)
        return region_normalise(m, x, region) * (1 + gamma) + beta
    if mask is None:
        region = torch.zeros(n, 1, h, w, dtype=torch.float64)
    else:
        region = mask.double().reshape(n, -1, *mask.shape[-2:])
        region = F.interpolate(region, size=(h, w), mode="nearest")
    y = region_normalise(m, x, region)
    vec = [1, -1, 1, 1]
    fg = y * region * (1 + _p(m.foreground_gamma).reshape(vec)) + _p(m.foreground_beta).reshape(vec)
    bg = y * (1 - region) * (1 + _p(m.background_gamma).reshape(vec)) + _p(m.background_beta).reshape(vec)
    return fg + bg
