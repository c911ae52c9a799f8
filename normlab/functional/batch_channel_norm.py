"""Functional Batch-Channel Normalization (Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization", https://arxiv.org/abs/1903.10520): a BatchNorm, then a group ("channel")
normalization with a per-group affine; the BatchNorm part optionally with estimated statistics for micro-batches.

See :class:`normlab.nn.BatchChannelNorm`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.functional._checks import apply_affine, check_num_groups
from normlab.functional._vision import channel_first, per_channel, spatial_dims, spatial_size
from normlab.functional.batch_norm import batch_norm

__all__ = ["batch_channel_norm"]


def _estimated_bn(
    xs: Tensor, x_shape: list[int], running_mean: Tensor | None, running_var: Tensor | None,
    num_batches_tracked: Tensor | None, training: bool, moving_speed: float, eps: float,
) -> Tensor:
    """The official ``EstBN``: normalise with the estimates, moved first (in training, without gradient) by
    ``moving_speed`` towards the batch mean and the batch's mean square deviation from the **old** mean estimate."""
    op = "batch_channel_norm"
    if running_mean is None or running_var is None:
        raise ValueError(f"{op}: estimate=True normalises with running_mean/running_var; got None")
    mean, var = running_mean.to(xs.dtype), running_var.to(xs.dtype)
    if training:
        if xs.shape[0] * spatial_size(xs) <= 1:
            raise ValueError(f"{op}: expected more than 1 value per channel when training, got input of size "
                             f"{x_shape}")
        with torch.no_grad():
            dims = (0, *spatial_dims(xs))
            batch_mean = xs.mean(dims)
            deviation = (xs - per_channel(mean, xs.dim(), xs.dtype)).square().mean(dims)
            mean = mean.lerp(batch_mean, moving_speed)
            var = var.lerp(deviation, moving_speed)
            # Normalise with the updated estimates in the compute dtype; the buffers take them rounded once.
            running_mean.copy_(mean)
            running_var.copy_(var)
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
    return (xs - per_channel(mean, xs.dim(), xs.dtype)) * per_channel(torch.rsqrt(var + eps), xs.dim(), xs.dtype)


def batch_channel_norm(
    x: Tensor, num_features: int, num_groups: int, running_mean: Tensor | None = None,
    running_var: Tensor | None = None, weight: Tensor | None = None, bias: Tensor | None = None,
    group_weight: Tensor | None = None, group_bias: Tensor | None = None, training: bool = False,
    momentum: float | None = 0.1, eps: float = 1e-5, num_batches_tracked: Tensor | None = None, estimate: bool = False,
    moving_speed: float = 0.1, channel_dim: int = 1, process_group: Any = None, sync_stats: bool = True,
) -> Tensor:
    """BCN: ``CN(BN(x))``. BN per channel (``weight``/``bias`` of size ``C``; batch statistics, or with ``estimate``
    the estimated ones); CN per sample over each group of ``C/num_groups`` channels and all positions (biased),
    then ``group_weight``/``group_bias`` of size ``num_groups``. See :class:`normlab.nn.BatchChannelNorm`."""
    op = "batch_channel_norm"
    xs = channel_first(x, num_features, channel_dim, op)
    check_num_groups(num_groups, num_features, op)
    if estimate:
        y = _estimated_bn(xs, list(x.shape), running_mean, running_var, num_batches_tracked, training, moving_speed,
                          eps)
        y = apply_affine(y, weight, bias, 1)
    else:
        y = batch_norm(xs, num_features, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
                       training=training, momentum=momentum, eps=eps, channel_dim=1,
                       num_batches_tracked=num_batches_tracked, process_group=process_group, sync_stats=sync_stats)
    if y.numel() == 0:
        return x.clone()
    groups = y.reshape(y.shape[0], num_groups, (num_features // num_groups) * spatial_size(y))
    var, mean = torch.var_mean(groups, -1, correction=0, keepdim=True)
    groups = (groups - mean) * torch.rsqrt(var + eps)
    if group_weight is not None:
        groups = groups * group_weight.to(y.dtype).reshape(1, -1, 1)
    if group_bias is not None:
        groups = groups + group_bias.to(y.dtype).reshape(1, -1, 1)
    return groups.reshape(y.shape).to(x.dtype)
