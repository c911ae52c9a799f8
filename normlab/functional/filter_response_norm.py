"""Functional Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan, "Filter Response
Normalization Layer: Eliminating Batch Dependence in the Training of Deep Neural Networks", CVPR 2020,
https://arxiv.org/abs/1911.09737).

See :class:`normlab.nn.FilterResponseNorm`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional._checks import apply_affine
from normlab.functional._vision import channel_first, per_channel, spatial_dims

__all__ = ["filter_response_norm"]


def filter_response_norm(
    x: Tensor, num_features: int, weight: Tensor | None = None, bias: Tensor | None = None, tau: Tensor | None = None,
    eps: float = 1e-6, channel_dim: int = 1,
) -> Tensor:
    """FRN + TLU: ``max(γ·x/sqrt(ν² + eps) + β, τ)`` with ``ν²`` the mean square of ``x[n, c]`` over its positions
    (no centring); ``tau=None`` leaves out the TLU. See :class:`normlab.nn.FilterResponseNorm`."""
    xs = channel_first(x, num_features, channel_dim, "filter_response_norm")
    if xs.numel() == 0:
        return x.clone()
    dims = spatial_dims(xs)
    nu2 = xs.square().mean(dims, keepdim=True) if dims else xs.square()
    y = xs * torch.rsqrt(nu2 + eps)
    y = apply_affine(y, weight, bias, 1)
    if tau is not None:
        y = torch.maximum(y, per_channel(tau, y.dim(), y.dtype))
    return y.to(x.dtype)
