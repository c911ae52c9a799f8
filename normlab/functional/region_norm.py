"""Functional Region Normalization (Yu, Guo, Jin, Wu, Chen, Li, Zhang, Liu, "Region Normalization for Image
Inpainting", AAAI 2020, https://arxiv.org/abs/1911.10375): the hole and the valid region of an inpainting mask are
normalised separately (RN-B), or two regions found from the features by a spatial-attention map (RN-L).

See :class:`normlab.nn.RegionNorm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab.functional._vision import channel_first, per_channel

__all__ = ["region_mask", "region_norm"]

STATISTICS = ("batch", "instance")


def region_mask(mask: Tensor | None, x: Tensor, op: str = "region_norm") -> Tensor:
    """The region mask (1 = hole) as ``(N, 1 or C, H, W)`` in ``x``'s dtype, resized to ``x``'s ``H×W`` by nearest
    neighbour as the official generator does; ``None`` is no hole. ``mask`` is ``(N, H', W')`` or
    ``(N, 1 or C, H', W')``, bool, integer or float (binary)."""
    n, c, h, w = x.shape
    if mask is None:
        return x.new_zeros((n, 1, h, w))
    if not isinstance(mask, Tensor):
        raise TypeError(f"{op}: expected mask to be a torch.Tensor or None, got {type(mask).__name__}")
    m = mask.unsqueeze(1) if mask.dim() == 3 else mask
    if m.dim() != 4:
        raise ValueError(f"{op}: expected a mask of size [N, H, W] or [N, 1 or C, H, W], got mask of size "
                         f"{list(mask.shape)}")
    if m.shape[0] != n:
        raise ValueError(f"{op}: expected a mask with batch size {n} (the input's), got mask of size "
                         f"{list(mask.shape)} for input of size {list(x.shape)}")
    if m.shape[1] not in (1, c):
        raise ValueError(f"{op}: expected a mask with 1 or {c} channels (the input's C), got mask of size "
                         f"{list(mask.shape)} for input of size {list(x.shape)}")
    m = m.to(x.dtype)
    if tuple(m.shape[2:]) != (h, w) and m.numel() > 0:
        m = F.interpolate(m, size=(h, w), mode="nearest")
    return m


def _normalise_regions(xs: Tensor, mask: Tensor, statistics: str, eps: float) -> Tensor:
    """``Σ_k M_k·(x − μ_k)/sqrt(σ²_k + ε_k)`` over the two regions ``M_1 = mask``, ``M_0 = 1 − mask``.

    ``"batch"`` (the official code): statistics per channel over ``(N, H, W)`` and ``ε_k = ε·NHW/S_k``, which is
    what its fill-with-the-mean BatchNorm rescaled by ``sqrt(S_k/NHW)`` computes. ``"instance"`` (the paper's
    formula): per ``(n, c)`` over ``(H, W)``, ``ε_k = ε``.
    """
    dims = (0, 2, 3) if statistics == "batch" else (2, 3)
    total = 1
    for d in dims:
        total *= xs.shape[d]
    out = torch.zeros_like(xs)
    for region in (mask, 1.0 - mask):
        size = region.expand_as(xs).sum(dims, keepdim=True)
        count = torch.where(size > 0, size, torch.ones_like(size))
        mean = (xs * region).sum(dims, keepdim=True) / count
        var = ((xs - mean).square() * region).sum(dims, keepdim=True) / count
        eps_k = eps * total / count if statistics == "batch" else eps
        out = out + region * (xs - mean) * torch.rsqrt(var + eps_k)
    return out


def _self_aware(xs: Tensor, sa_weight: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """RN-L's importance map ``S = sigmoid(conv7x7([mean_C x, max_C x]))`` and its region mask ``1[S ≥ t]``
    (thresholded without gradient)."""
    pooled = torch.cat([xs.mean(1, keepdim=True), xs.amax(1, keepdim=True)], dim=1)
    k = sa_weight.shape[-1]
    importance = torch.sigmoid(F.conv2d(pooled, sa_weight.to(xs.dtype), padding=k // 2))
    return importance, (importance.detach() >= threshold).to(xs.dtype)


def region_norm(
    x: Tensor, num_features: int, mask: Tensor | None = None, foreground_gamma: Tensor | None = None,
    foreground_beta: Tensor | None = None, background_gamma: Tensor | None = None,
    background_beta: Tensor | None = None, sa_weight: Tensor | None = None, gamma_weight: Tensor | None = None,
    gamma_bias: Tensor | None = None, beta_weight: Tensor | None = None, beta_bias: Tensor | None = None,
    learnable: bool = False, threshold: float = 0.8, statistics: str = "batch", training: bool = False,
    eps: float = 1e-5, channel_dim: int = 1,
) -> Tensor:
    """RN-B (``learnable=False``): regions from ``mask`` (1 = hole), per-region affine ``(1 + γ)`` on the masked
    output and both ``β`` added everywhere, as the official code does. RN-L (``learnable=True``): regions from the
    importance map, spatial affine ``x̂·(1 + conv(S)) + conv(S)``. See :class:`normlab.nn.RegionNorm`."""
    op = "region_norm"
    xs = channel_first(x, num_features, channel_dim, op, min_dim=4)
    if xs.dim() != 4:
        raise ValueError(f"{op}: expected an input of size [N, {num_features}, H, W], got input of size "
                         f"{list(x.shape)}")
    if statistics not in STATISTICS:
        raise ValueError(f"{op}: expected statistics in {STATISTICS}, got {statistics!r}")
    if learnable and mask is not None:
        raise ValueError(f"{op}: RN-L (learnable=True) finds its regions in the features; expected mask=None, got a "
                         f"mask of size {list(mask.shape)}")
    if statistics == "batch" and training and xs.shape[0] * xs.shape[2] * xs.shape[3] <= 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got input of size "
                         f"{list(x.shape)}")
    m = region_mask(mask, xs, op)
    if xs.numel() == 0:
        return x.clone()
    if learnable:
        if sa_weight is None or gamma_weight is None or beta_weight is None:
            raise ValueError(f"{op}: learnable=True needs sa_weight, gamma_weight and beta_weight; got None")
        importance, m = _self_aware(xs, sa_weight, threshold)
        k = gamma_weight.shape[-1]
        gamma = F.conv2d(importance, gamma_weight.to(xs.dtype), None if gamma_bias is None else gamma_bias.to(xs.dtype),
                         padding=k // 2)
        beta = F.conv2d(importance, beta_weight.to(xs.dtype), None if beta_bias is None else beta_bias.to(xs.dtype),
                        padding=k // 2)
        return (_normalise_regions(xs, m, statistics, eps) * (1.0 + gamma) + beta).to(x.dtype)
    y = _normalise_regions(xs, m, statistics, eps)
    out = torch.zeros_like(y)
    for region, scale, shift in ((m, foreground_gamma, foreground_beta), (1.0 - m, background_gamma, background_beta)):
        part = y * region
        if scale is not None:
            part = part * (1.0 + per_channel(scale, 4, y.dtype))
        if shift is not None:
            part = part + per_channel(shift, 4, y.dtype)
        out = out + part
    return out.to(x.dtype)
