"""Functional LayerNorm (Ba, Kiros, Hinton 2016, https://arxiv.org/abs/1607.06450).

See :class:`normlab.nn.LayerNorm` for the definition, shapes and dtype contract.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from normlab.functional._checks import check_channels, compute_dtype

__all__ = ["layer_norm"]


def layer_norm(
    x: Tensor,
    normalized_shape: int | tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    channel_dim: int = -1,
) -> Tensor:
    """LayerNorm over ``normalized_shape`` (trailing dims) or over the channel axis ``channel_dim``."""
    cd = check_channels(x, normalized_shape, channel_dim, "layer_norm")
    shape = normalized_shape if isinstance(normalized_shape, tuple) else (normalized_shape,)
    ct = compute_dtype(x)
    moved = not isinstance(normalized_shape, tuple) and cd != x.dim() - 1
    xs = x.to(ct)
    if moved:
        xs = xs.movedim(cd, -1)
    w = weight.to(ct) if weight is not None else None
    b = bias.to(ct) if bias is not None else None
    y = F.layer_norm(xs, shape, w, b, eps)
    if moved:
        y = y.movedim(-1, cd)
    return y.to(x.dtype)
