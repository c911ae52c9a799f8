"""Functional GroupNorm (Wu & He 2018, https://arxiv.org/abs/1803.08494) and InstanceNorm
(Ulyanov, Vedaldi, Lempitsky 2016, https://arxiv.org/abs/1607.08022).

See :class:`normlab.nn.GroupNorm` and :class:`normlab.nn.InstanceNorm`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from normlab.functional._checks import affine_in, check_channels, from_compute, to_compute

__all__ = ["group_norm", "instance_norm"]


def group_norm(
    x: Tensor, num_channels: int, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5, channel_dim: int = 1,
) -> Tensor:
    """GroupNorm: per sample, statistics over each group of ``num_channels // num_groups`` channels and all
    positions. ``channel_dim=-1`` takes token tensors ``(B, N, C)``."""
    cd = check_channels(x, num_channels, channel_dim, "group_norm", min_dim=2)
    if cd == 0:
        raise ValueError(f"group_norm: channel_dim must not be the batch axis 0, got channel_dim={channel_dim}")
    xs = to_compute(x, cd, 1)
    return from_compute(F.group_norm(xs, num_groups, *affine_in(xs.dtype, weight, bias), eps), x, cd, 1)


def instance_norm(
    x: Tensor, num_features: int, running_mean: Tensor | None = None, running_var: Tensor | None = None,
    weight: Tensor | None = None, bias: Tensor | None = None, use_input_stats: bool = True, momentum: float = 0.1,
    eps: float = 1e-5, channel_dim: int = 1,
) -> Tensor:
    """InstanceNorm: per sample and channel, statistics over all positions. Running buffers, when given and
    ``use_input_stats`` is true, are updated in place with the batch mean of the instance statistics."""
    cd = check_channels(x, num_features, channel_dim, "instance_norm", min_dim=3)
    if cd == 0:
        raise ValueError(f"instance_norm: channel_dim must not be the batch axis 0, got channel_dim={channel_dim}")
    if use_input_stats:
        spatial = x.numel() // max(x.shape[0] * x.shape[cd], 1)
        if spatial <= 1 and x.numel() > 0:
            raise ValueError(
                f"instance_norm: expected more than 1 spatial element per channel, got input of size {list(x.shape)}"
            )
    xs = to_compute(x, cd, 1)
    w, b = affine_in(xs.dtype, weight, bias)
    y = F.instance_norm(xs, running_mean, running_var, w, b, use_input_stats, momentum, eps)
    return from_compute(y, x, cd, 1)
