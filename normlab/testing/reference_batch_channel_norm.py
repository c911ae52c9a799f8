"""Float64 reference of Batch-Channel Normalization (https://arxiv.org/abs/1903.10520), from the definitions:
BN (batch statistics, running ones, or the estimated ones of the micro-batch mode), then the per-sample group
normalization with its per-group affine. Independent of :mod:`normlab.functional.batch_channel_norm`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.registry import register_reference
from normlab.testing.reference_evo_norm import channel_affine, cvec, moments

__all__ = ["batch_channel_norm", "estimated_stats"]


def estimated_stats(m: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    """The estimated mean and variance the micro-batch mode normalises ``x`` with (after a training step's move)."""
    mean, var = m.running_mean.detach().double(), m.running_var.detach().double()
    if not m.training:
        return mean, var
    x = x.to(torch.float64)
    dims = (0, *range(2, x.dim()))
    count = x.numel() // x.shape[1]
    batch_mean = x.sum(dims) / count
    deviation = ((x - cvec(mean, x.dim())) ** 2).sum(dims) / count
    r = m.moving_speed
    return (1 - r) * mean + r * batch_mean, (1 - r) * var + r * deviation


@register_reference("batch_channel_norm")
def batch_channel_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    x = x.to(torch.float64)
    nd = x.dim()
    if m.estimate:
        mean, var = (cvec(t, nd) for t in estimated_stats(m, x))
    elif m.training:
        mean, var = moments(x, (0, *range(2, nd)))
    else:
        mean, var = cvec(m.running_mean, nd), cvec(m.running_var, nd)
    y = channel_affine((x - mean) / torch.sqrt(var + m.eps), m)
    size = x.shape[1] // m.num_groups
    parts = []
    for g in range(m.num_groups):
        block = y[:, g * size:(g + 1) * size]
        mu, v = moments(block, tuple(range(1, nd)))
        out = (block - mu) / torch.sqrt(v + m.eps)
        if m.group_weight is not None:
            out = out * m.group_weight.detach().double()[g] + m.group_bias.detach().double()[g]
        parts.append(out)
    return torch.cat(parts, dim=1)
