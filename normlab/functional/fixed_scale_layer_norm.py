"""Functional fixed-scale LayerNorm ("FakeLayerNorm") of Baroni et al. 2025, "Transformers Don't Need LayerNorm at
Inference Time" (https://arxiv.org/abs/2507.02559).

See :class:`normlab.nn.FakeLayerNorm` for the definition, shapes and dtype contract.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from normlab.functional._checks import check_channels, compute_dtype

__all__ = ["fixed_scale_layer_norm"]


def fixed_scale_layer_norm(
    x: Tensor, normalized_shape: int, weight: Tensor | None = None, bias: Tensor | None = None,
    sigma: Tensor | float = 1.0, fixed: bool = False, eps: float = 1e-5, channel_dim: int = -1,
) -> Tensor:
    """LayerNorm over the channel axis ``channel_dim``; with ``fixed`` the per-token standard deviation is replaced by
    the constant ``sigma``: ``y = γ ⊙ (x − mean(x)) / σ̄ + β`` (linear in ``x``)."""
    cd = check_channels(x, normalized_shape, channel_dim, "fixed_scale_layer_norm")
    if cd != x.dim() - 1:
        y = fixed_scale_layer_norm(x.movedim(cd, -1), normalized_shape, weight, bias, sigma, fixed, eps)
        return y.movedim(-1, cd)
    ct = compute_dtype(x)
    xs = x.to(ct)
    w = weight.to(ct) if weight is not None else None
    b = bias.to(ct) if bias is not None else None
    if not fixed:
        return F.layer_norm(xs, (normalized_shape,), w, b, eps).to(x.dtype)
    s = sigma.to(ct) if isinstance(sigma, Tensor) else sigma
    y = (xs - xs.mean(-1, keepdim=True)) / s
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y.to(x.dtype)
