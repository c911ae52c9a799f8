"""Functional Dynamic Tanh (Zhu, Chen, He, LeCun, Liu, CVPR 2025, https://arxiv.org/abs/2503.10622).

See :class:`normlab.nn.DyT`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional._checks import apply_affine, check_channels, compute_dtype

__all__ = ["dyt"]


def dyt(
    x: Tensor, num_features: int, alpha: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
    channel_dim: int = -1,
) -> Tensor:
    """``weight * tanh(alpha * x) + bias`` with a scalar ``alpha`` and per-channel ``weight``/``bias``."""
    cd = check_channels(x, num_features, channel_dim, "dyt")
    xs = x.to(compute_dtype(x))
    return apply_affine(torch.tanh(alpha.to(xs.dtype) * xs), weight, bias, cd).to(x.dtype)
