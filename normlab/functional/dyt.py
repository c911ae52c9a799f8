"""Functional Dynamic Tanh (Zhu, Chen, He, LeCun, Liu, CVPR 2025, https://arxiv.org/abs/2503.10622).

See :class:`normlab.nn.DyT`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional._checks import check_channels, compute_dtype

__all__ = ["dyt"]


def dyt(
    x: Tensor,
    num_features: int,
    alpha: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    channel_dim: int = -1,
) -> Tensor:
    """``weight * tanh(alpha * x) + bias`` with a scalar ``alpha`` and per-channel ``weight``/``bias``."""
    cd = check_channels(x, num_features, channel_dim, "dyt")
    ct = compute_dtype(x)
    y = torch.tanh(alpha.to(ct) * x.to(ct))
    shape = [1] * x.dim()
    shape[cd] = num_features
    if weight is not None:
        y = y * weight.to(ct).reshape(shape)
    if bias is not None:
        y = y + bias.to(ct).reshape(shape)
    return y.to(x.dtype)
