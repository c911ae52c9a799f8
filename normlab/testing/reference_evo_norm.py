"""Float64 references of EvoNorm-B0 and EvoNorm-S0 (https://arxiv.org/abs/2004.02967, Table 1), written from the
paper's formulas with explicit means (no ``torch.var``), independently of :mod:`normlab.functional.evo_norm`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.registry import register_reference
from normlab.testing.reference import affine64

__all__ = ["channel_affine", "cvec", "evo_norm_b0", "evo_norm_s0", "moments"]


def cvec(t: Tensor, ndim: int) -> Tensor:
    """A per-channel parameter or buffer as float64 ``(1, C, 1, ...)``."""
    return t.detach().to(torch.float64).reshape([1, -1] + [1] * (ndim - 2))


def moments(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over ``dims`` (kept), computed as sums."""
    count = 1
    for d in dims:
        count *= x.shape[d]
    mean = x.sum(dims, keepdim=True) / count
    return mean, ((x - mean) ** 2).sum(dims, keepdim=True) / count


def channel_affine(y: Tensor, m: Any) -> Tensor:
    """:func:`~normlab.testing.reference.affine64` on a channels-first ``y``."""
    return affine64(y, m, channel_dim=1)


@register_reference("evo_norm_b0")
def evo_norm_b0(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``x / max(sqrt(s² + eps), v·x + sqrt(t² + eps))``: ``s²`` the batch variance (train) or ``running_var``."""
    x = x.to(torch.float64)
    spatial = tuple(range(2, x.dim()))
    if m.training:
        _, s2 = moments(x, (0, *spatial))
    else:
        s2 = cvec(m.running_var, x.dim())
    t2 = moments(x, spatial)[1] if spatial else torch.zeros_like(x)
    d = torch.maximum(torch.sqrt(s2 + m.eps), cvec(m.v, x.dim()) * x + torch.sqrt(t2 + m.eps))
    return channel_affine(x / d, m)


def evo_norm_b0_running_var(m: Any, x: Tensor) -> Tensor:
    """The ``running_var`` after one training step on ``x`` (TF: no Bessel; ``m.bessel``: times ``n/(n−1)``)."""
    x = x.to(torch.float64)
    dims = (0, *range(2, x.dim()))
    s2 = moments(x, dims)[1].reshape(-1)
    n = x.numel() // x.shape[1]
    if m.bessel:
        s2 = s2 * n / (n - 1)
    return (1 - m.momentum) * m.running_var.detach().double() + m.momentum * s2


@register_reference("evo_norm_s0")
def evo_norm_s0(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``x·sigmoid(v·x) / sqrt(σ²_group + eps)``, the group variance taken channel block by channel block."""
    x = x.to(torch.float64)
    c, g = x.shape[1], m.num_groups
    size = c // g
    std = torch.cat([
        torch.sqrt(moments(x[:, k * size:(k + 1) * size], tuple(range(1, x.dim())))[1] + m.eps).expand(
            -1, size, *x.shape[2:])
        for k in range(g)
    ], dim=1)
    gate = 1.0 / (1.0 + torch.exp(-cvec(m.v, x.dim()) * x))
    return channel_affine(x * gate / std, m)
