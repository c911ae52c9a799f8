"""Functional LIN and AdaLIN (Kim, Kim, Kang, Lee, "U-GAT-IT: Unsupervised Generative Attentional Networks with
Adaptive Layer-Instance Normalization for Image-to-Image Translation", ICLR 2020, https://arxiv.org/abs/1907.10830):
a per-channel mix ``ρ·IN(x) + (1 − ρ)·LN(x)``, with learnt (LIN) or externally given (AdaLIN) ``γ``, ``β``.

See :class:`normlab.nn.LIN` and :class:`normlab.nn.AdaLIN`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional._checks import apply_affine
from normlab.functional._vision import channel_first, per_channel, spatial_dims, spatial_size

__all__ = ["ada_lin", "lin"]


def _mix(xs: Tensor, x_shape: list[int], rho: Tensor, eps: float, unbiased: bool, smoothing: bool, op: str) -> Tensor:
    """``ρ·x̂_I + (1 − ρ)·x̂_L`` (paper Eq. 5-6) in ``xs``'s dtype."""
    if unbiased and spatial_size(xs) <= 1 and xs.numel() > 0:
        raise ValueError(f"{op}: unbiased variances (the official PyTorch code's) need more than 1 position per "
                         f"channel, got input of size {x_shape}; variant='tf' uses biased ones")
    dims = spatial_dims(xs)
    correction = 1 if unbiased else 0
    var_i, mean_i = torch.var_mean(xs, dims, correction=correction, keepdim=True)
    var_l, mean_l = torch.var_mean(xs, (1, *dims), correction=correction, keepdim=True)
    r = per_channel(rho, xs.dim(), xs.dtype)
    if smoothing:  # the official TF code's AdaLIN uses clip(ρ − 0.1, 0, 1)
        r = torch.clamp(r - 0.1, 0.0, 1.0)
    return r * ((xs - mean_i) * torch.rsqrt(var_i + eps)) + (1.0 - r) * ((xs - mean_l) * torch.rsqrt(var_l + eps))


def lin(
    x: Tensor, num_features: int, rho: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5, unbiased: bool = True, channel_dim: int = 1,
) -> Tensor:
    """LIN: ``γ_c·(ρ_c·IN(x) + (1 − ρ_c)·LN(x)) + β_c``; IN over the positions per ``(n, c)``, LN over ``(C, *)``
    per ``n``, unbiased variances unless ``unbiased=False``. See :class:`normlab.nn.LIN`."""
    op = "lin"
    xs = channel_first(x, num_features, channel_dim, op, min_dim=3)
    if xs.numel() == 0:
        return x.clone()
    y = _mix(xs, list(x.shape), rho, eps, unbiased, False, op)
    y = apply_affine(y, weight, bias, 1)
    return y.to(x.dtype)


def _style(t: Tensor | None, name: str, xs: Tensor, op: str) -> Tensor | None:
    """``γ`` or ``β`` of shape ``(N, C)`` (one per sample) or ``(C,)``, shaped to broadcast against ``xs``."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor or None, got {type(t).__name__}")
    n, c = xs.shape[:2]
    if list(t.shape) not in ([n, c], [c]):
        raise ValueError(f"{op}: expected {name} of size [{n}, {c}] (one per sample) or [{c}], got {name} of size "
                         f"{list(t.shape)}")
    return t.to(xs.dtype).reshape([-1, c] + [1] * (xs.dim() - 2))


def ada_lin(
    x: Tensor, num_features: int, rho: Tensor, gamma: Tensor | None = None, beta: Tensor | None = None,
    eps: float = 1e-5, unbiased: bool = True, smoothing: bool = False, channel_dim: int = 1,
) -> Tensor:
    """AdaLIN: ``γ·(ρ·IN(x) + (1 − ρ)·LN(x)) + β`` with ``γ``, ``β`` given per sample ``(N, C)`` (or ``(C,)``);
    ``None`` leaves the mix unscaled / unshifted. ``smoothing`` uses ``clip(ρ − 0.1, 0, 1)`` (official TF code).
    See :class:`normlab.nn.AdaLIN`."""
    op = "ada_lin"
    xs = channel_first(x, num_features, channel_dim, op, min_dim=3)
    g, b = _style(gamma, "gamma", xs, op), _style(beta, "beta", xs, op)
    if xs.numel() == 0:
        return x.clone()
    y = _mix(xs, list(x.shape), rho, eps, unbiased, smoothing, op)
    if g is not None:
        y = y * g
    if b is not None:
        y = y + b
    return y.to(x.dtype)
