"""Float64 reference implementations of every norm, written from the definitions (no ``torch.nn.functional``
norm kernels), shared by the contract tests and the benchmarks.

Each reference has the signature ``reference(module, x, mask=None) -> Tensor``: it reads the module's
parameters, buffers and ``training`` flag, computes in float64 and does **not** update any state. Each registers
itself by norm name (``@register_reference``), which is how :attr:`NormSpec.reference` finds it.
"""

from __future__ import annotations

from typing import Any, overload

import torch
from torch import Tensor

from normlab.registry import register_reference

__all__ = [
    "affine64",
    "batch_norm",
    "crms_norm",
    "dyt",
    "fixed_scale_layer_norm",
    "group_norm",
    "identity",
    "instance_norm",
    "layer_norm",
    "rms_norm",
    "scale_norm",
    "to64",
]


@overload
def to64(t: Tensor) -> Tensor: ...
@overload
def to64(t: None) -> None: ...
def to64(t: Tensor | None) -> Tensor | None:
    """A detached float64 copy (``None`` stays ``None``)."""
    return None if t is None else t.detach().to(torch.float64)


def _last(x: Tensor, channel_dim: int) -> Tensor:
    return x.movedim(channel_dim, -1)


def affine64(y: Tensor, m: Any, channel_dim: int = -1) -> Tensor:
    """``y * weight + bias`` in float64 with the module's ``weight`` / ``bias`` (each skipped when absent), per
    channel along axis ``channel_dim`` of ``y``."""
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    w, b = to64(getattr(m, "weight", None)), to64(getattr(m, "bias", None))
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y


@register_reference("layer_norm")
def layer_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    x = x.to(torch.float64)
    if isinstance(m.normalized_shape, tuple):
        dims = tuple(range(-len(m.normalized_shape), 0))
        mu = x.mean(dims, keepdim=True)
        var = ((x - mu) ** 2).mean(dims, keepdim=True)
        return affine64((x - mu) / torch.sqrt(var + m.eps), m)
    xl = _last(x, m.channel_dim)
    mu = xl.mean(-1, keepdim=True)
    var = ((xl - mu) ** 2).mean(-1, keepdim=True)
    return affine64((xl - mu) / torch.sqrt(var + m.eps), m).movedim(-1, m.channel_dim)


@register_reference("rms_norm", "prms_norm", "srms_norm")
def rms_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """RMSNorm, pRMSNorm (``m.k``) and SRMSNorm, with either eps placement."""
    xl = _last(x.to(torch.float64), m.channel_dim)
    k = getattr(m, "k", xl.shape[-1])
    ms = (xl[..., :k] ** 2).sum(-1, keepdim=True) / k
    if m.eps_placement == "inside":
        y = xl / torch.sqrt(ms + m.eps)
    else:
        y = xl / (torch.sqrt(ms) + m.eps)
    if getattr(m, "unit_offset", False) and m.weight is not None:  # Gemma: the gain is 1 + weight
        y = y * (1.0 + to64(m.weight))
        b = to64(getattr(m, "bias", None))
        return (y if b is None else y + b).movedim(-1, m.channel_dim)
    return affine64(y, m).movedim(-1, m.channel_dim)


@register_reference("crms_norm")
def crms_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """CRMSNorm via its definition: rebuild the full zero-mean vector and take LayerNorm's first d-1 outputs."""
    z = _last(x.to(torch.float64), m.channel_dim)
    full = torch.cat([z, -z.sum(-1, keepdim=True)], dim=-1)
    var = (full**2).mean(-1, keepdim=True)  # zero mean by construction
    y = (full / torch.sqrt(var + m.eps))[..., :-1]
    return affine64(y, m).movedim(-1, m.channel_dim)


@register_reference("scale_norm")
def scale_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    xl = _last(x.to(torch.float64), m.channel_dim)
    norm = torch.sqrt((xl**2).sum(-1, keepdim=True)).clamp_min(m.eps)
    return (xl * to64(m.weight) / norm).movedim(-1, m.channel_dim)


@register_reference("dyt")
def dyt(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    xl = _last(x.to(torch.float64), m.channel_dim)
    return affine64(torch.tanh(to64(m.alpha) * xl), m).movedim(-1, m.channel_dim)


@register_reference("identity")
def identity(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    return x.to(torch.float64)


@register_reference("group_norm")
def group_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    xc = x.to(torch.float64).movedim(m.channel_dim, 1)
    n, c = xc.shape[:2]
    g = xc.reshape(n, m.num_groups, -1)
    mu = g.mean(-1, keepdim=True)
    var = ((g - mu) ** 2).mean(-1, keepdim=True)
    y = ((g - mu) / torch.sqrt(var + m.eps)).reshape(xc.shape)
    shape = [1, c] + [1] * (xc.dim() - 2)
    if m.weight is not None:
        y = y * to64(m.weight).reshape(shape) + to64(m.bias).reshape(shape)
    return y.movedim(1, m.channel_dim)


def _per_channel(y: Tensor, m: Any, shape: list[int]) -> Tensor:
    if m.weight is not None:
        y = y * to64(m.weight).reshape(shape)
    if m.bias is not None:
        y = y + to64(m.bias).reshape(shape)
    return y


@register_reference("instance_norm")
def instance_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    xc = x.to(torch.float64).movedim(m.channel_dim, 1)
    shape = [1, xc.shape[1]] + [1] * (xc.dim() - 2)
    if m.training or not m.track_running_stats:
        dims = tuple(range(2, xc.dim()))
        mu = xc.mean(dims, keepdim=True)
        var = ((xc - mu) ** 2).mean(dims, keepdim=True)
    else:
        mu, var = to64(m.running_mean).reshape(shape), to64(m.running_var).reshape(shape)
    return _per_channel((xc - mu) / torch.sqrt(var + m.eps), m, shape).movedim(1, m.channel_dim)


@register_reference("batch_norm")
def batch_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """BatchNorm with batch statistics over valid positions (train, or no running stats) or running stats."""
    xl = _last(x.to(torch.float64), m.channel_dim)
    if m.training or m.running_mean is None:
        rows = xl.reshape(-1, xl.shape[-1])
        if mask is not None:
            rows = rows[mask.reshape(-1).bool()]
        mu = rows.mean(0)
        var = ((rows - mu) ** 2).mean(0)
    else:
        mu, var = to64(m.running_mean), to64(m.running_var)
    return affine64((xl - mu) / torch.sqrt(var + m.eps), m).movedim(-1, m.channel_dim)


@register_reference("fixed_scale_layer_norm")
def fixed_scale_layer_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """LayerNorm (``m.fixed`` off) or ``γ (x − mean x)/σ̄ + β`` with the ``sigma`` buffer as σ̄ (Baroni et al. 2025)."""
    x = x.to(torch.float64)
    mu = x.mean(-1, keepdim=True)
    if m.fixed:
        return affine64((x - mu) / to64(m.sigma), m)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return affine64((x - mu) / torch.sqrt(var + m.eps), m)
