"""Float64 reference of IBN (IBN-Net-a, https://arxiv.org/abs/1807.09441): InstanceNorm on the first channels,
BatchNorm on the rest, from the definitions (explicit means, no torch norm kernels)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.registry import register_reference
from normlab.testing.reference_evo_norm import cvec, moments

__all__ = ["ibn"]


@register_reference("ibn")
def ibn(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    x = x.to(torch.float64)
    h = m.instance_channels
    spatial = tuple(range(2, x.dim()))
    x_in, x_bn = x[:, :h], x[:, h:]
    mu_i, var_i = moments(x_in, spatial)
    y_in = (x_in - mu_i) / torch.sqrt(var_i + m.eps)
    if m.training:
        mu_b, var_b = moments(x_bn, (0, *spatial))
    else:
        mu_b, var_b = cvec(m.running_mean, x.dim()), cvec(m.running_var, x.dim())
    y = torch.cat([y_in, (x_bn - mu_b) / torch.sqrt(var_b + m.eps)], dim=1)
    if m.weight is not None:
        y = y * cvec(m.weight, x.dim()) + cvec(m.bias, x.dim())
    return y
