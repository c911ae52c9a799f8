"""Helpers shared by the channel-first vision norms (EvoNorm, BCN, IBN, LIN/AdaLIN, FRN, Online Norm, Region Norm):
input validation for ``(N, C, *)`` tensors and per-channel broadcasting."""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional._checks import check_channels, compute_dtype

__all__ = ["channel_first", "ema_", "per_channel", "spatial_dims", "spatial_size"]


def channel_first(x: Tensor, num_features: int, channel_dim: int, op: str, *, min_dim: int = 2) -> Tensor:
    """Validate an ``(N, C, *)`` input (dtype, rank, ``C``) and return it in its compute dtype (float32 for
    float16/bfloat16). Any memory format is accepted (channels-last included)."""
    cd = check_channels(x, num_features, channel_dim, op, min_dim=min_dim)
    if cd != 1:
        raise ValueError(f"{op}: works on (N, C, *) tensors; expected channel_dim=1, got {channel_dim}")
    return x.to(compute_dtype(x))


def per_channel(t: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
    """A per-channel vector ``(C,)`` shaped ``(1, C, 1, ...)`` to broadcast against an ``ndim``-D input."""
    return t.to(dtype).reshape([1, -1] + [1] * (ndim - 2))


def spatial_dims(x: Tensor) -> tuple[int, ...]:
    """The axes after ``(N, C)``."""
    return tuple(range(2, x.dim()))


def spatial_size(x: Tensor) -> int:
    """The number of positions per ``(n, c)``: the product of the sizes after ``(N, C)`` (1 for ``(N, C)``)."""
    out = 1
    for s in x.shape[2:]:
        out *= int(s)
    return out


@torch.no_grad()
def ema_(buf: Tensor, new: Tensor, factor: float) -> None:
    """``buf <- (1 - factor)·buf + factor·new``, computed in ``new``'s (statistics) dtype and rounded once into
    ``buf`` (a float16 buffer is not stepped in float16)."""
    buf.copy_(buf.to(new.dtype).mul(1.0 - factor).add(new.detach(), alpha=factor))
