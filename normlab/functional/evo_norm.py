"""Functional EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan, Le, "Evolving Normalization-Activation Layers",
NeurIPS 2020, https://arxiv.org/abs/2004.02967): normalization and activation in one layer.

See :class:`normlab.nn.EvoNormB0` and :class:`normlab.nn.EvoNormS0`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional._checks import apply_affine, check_num_groups
from normlab.functional._vision import channel_first, ema_, per_channel, spatial_dims, spatial_size

__all__ = ["evo_norm_b0", "evo_norm_s0"]


def evo_norm_b0(
    x: Tensor, num_features: int, v: Tensor, running_var: Tensor | None = None, weight: Tensor | None = None,
    bias: Tensor | None = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5, bessel: bool = False,
    channel_dim: int = 1,
) -> Tensor:
    """EvoNorm-B0: ``y = x / max(sqrt(s²_c + eps), v·x + sqrt(t²_{n,c} + eps)) · γ + β`` (paper Table 1, B0).

    ``s²`` is the biased batch variance over ``(N, *)`` (training, or no ``running_var``) or ``running_var``; ``t²``
    the biased instance variance over ``*``. In training ``running_var`` moves towards ``s²`` by ``momentum``
    (times ``n/(n-1)`` when ``bessel``, timm's convention). See :class:`normlab.nn.EvoNormB0`.
    """
    op = "evo_norm_b0"
    xs = channel_first(x, num_features, channel_dim, op)
    nd = xs.dim()
    if training or running_var is None:
        count = xs.shape[0] * spatial_size(xs)
        if count <= 1:
            raise ValueError(f"{op}: expected more than 1 value per channel when training, got input of size "
                             f"{list(x.shape)}")
        batch_var = xs.var((0, *spatial_dims(xs)), correction=0, keepdim=True)
        if training and running_var is not None:
            stat = batch_var.reshape(-1) * (count / (count - 1) if bessel else 1.0)
            ema_(running_var, stat, momentum)
    else:
        batch_var = per_channel(running_var, nd, xs.dtype)
    if xs.numel() == 0:
        return x.clone()
    dims = spatial_dims(xs)
    inst_var = xs.var(dims, correction=0, keepdim=True) if dims else torch.zeros_like(xs)
    right = per_channel(v, nd, xs.dtype) * xs + torch.sqrt(inst_var + eps)
    y = xs / torch.maximum(torch.sqrt(batch_var + eps), right)
    return apply_affine(y, weight, bias, 1).to(x.dtype)


def evo_norm_s0(
    x: Tensor, num_features: int, num_groups: int, v: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5, channel_dim: int = 1,
) -> Tensor:
    """EvoNorm-S0: ``y = x·sigmoid(v·x) / sqrt(σ²_{n,g} + eps) · γ + β`` with the biased variance of each group of
    ``C / num_groups`` channels and all positions, per sample (paper Table 1, S0). See :class:`normlab.nn.EvoNormS0`.
    """
    op = "evo_norm_s0"
    xs = channel_first(x, num_features, channel_dim, op)
    check_num_groups(num_groups, num_features, op)
    if xs.numel() == 0:
        return x.clone()
    n = xs.shape[0]
    groups = xs.reshape(n, num_groups, (num_features // num_groups) * spatial_size(xs))
    std = torch.sqrt(groups.var(-1, correction=0, keepdim=True) + eps)
    denom = std.expand(groups.shape).reshape(xs.shape)
    num = xs * torch.sigmoid(per_channel(v, xs.dim(), xs.dtype) * xs)
    return apply_affine(num / denom, weight, bias, 1).to(x.dtype)
