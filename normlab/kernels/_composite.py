"""Composite (plain PyTorch) bodies of the kernel ops: what a custom op runs where no fused kernel is available
(no compiler on this machine, or a device without one).

Every function works on the last axis and mirrors ``csrc/norms.cpp`` line for line: the forwards call
:mod:`normlab.functional`, and the backwards are the closed-form gradients the C++ kernels implement (they run
below autograd, inside a custom op, so they cannot differentiate the forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab.functional._checks import compute_dtype
from normlab.functional.dyt import dyt
from normlab.functional.layer_norm import layer_norm
from normlab.functional.rms_norm import crms_norm, rms_norm, scale_norm

__all__ = ["INSIDE", "OUTSIDE", "CRMS", "SCALE", "rms_family_forward", "rms_family_backward", "layer_norm_backward",
           "dyt_forward", "dyt_backward", "add_norm_forward", "layer_norm_forward"]

# Statistic of the rms family (the ``mode`` of the C++ kernels).
INSIDE, OUTSIDE, CRMS, SCALE = 0, 1, 2, 3


def rms_family_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, scale: Tensor | None, eps: float, mode: int, k: int
) -> Tensor:
    c = x.shape[-1]
    if mode == CRMS:
        return crms_norm(x, c, weight, bias, eps)
    if mode == SCALE:
        assert scale is not None
        return scale_norm(x, c, scale, eps)
    return rms_norm(x, c, weight, bias, eps, mode == INSIDE, -1, None if k == c else k)


def layer_norm_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return layer_norm(x, x.shape[-1], weight, bias, eps)


def dyt_forward(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    return dyt(x, x.shape[-1], alpha, weight, bias)


def add_norm_forward(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, mode: int
) -> tuple[Tensor, Tensor]:
    """``h = x + residual``; ``(norm(h), h)`` with LayerNorm for ``mode < 0``, else the rms-family ``mode``."""
    h = x + residual.to(x.dtype)
    if mode < 0:
        return layer_norm_forward(h, weight, bias, eps), h
    return rms_family_forward(h, weight, bias, None, eps, mode, h.shape[-1]), h


def _rows_sum(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).sum(0)


def _cast(grad: Tensor, like: Tensor | None) -> Tensor:
    return grad.to(like.dtype).reshape(like.shape) if like is not None else grad


def rms_family_backward(
    grad: Tensor, x: Tensor, weight: Tensor | None, scale: Tensor | None, grad_add: Tensor | None,
    eps: float, mode: int, k: int, needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias, dscale) of ``y = x * r * w + b``; see the derivation in ``csrc/norms.cpp``."""
    ct = compute_dtype(x)
    xs, g, c_ = x.to(ct), grad.to(ct), x.shape[-1]
    shift: Tensor | float = 0.0
    gw = g * weight.to(ct) if weight is not None else g
    s = (gw * xs).sum(-1, keepdim=True)
    if mode == CRMS:
        shift = xs.sum(-1, keepdim=True)
        r = torch.rsqrt((xs.square().sum(-1, keepdim=True) + shift.square()) / (c_ + 1) + eps)
        c = r**3 * s / (c_ + 1)
    elif mode == SCALE:
        assert scale is not None
        nrm = torch.linalg.vector_norm(xs, dim=-1, keepdim=True)
        n = nrm.clamp_min(eps)
        r = scale.to(ct) / n
        c = torch.where(nrm >= eps, r * s / n.square(), torch.zeros_like(s))
    else:
        ms = xs[..., :k].square().mean(-1, keepdim=True)
        if mode == INSIDE:
            r = torch.rsqrt(ms + eps)
            c = r**3 * s / k
        else:
            rms = ms.sqrt()
            r = 1.0 / (rms + eps)
            c = r.square() * s / (k * rms)
    term = c * (xs[..., :k] + (shift if isinstance(shift, float) else shift))
    dx = (gw * r - F.pad(term, (0, c_ - k))).to(x.dtype)
    if grad_add is not None:
        dx = dx + grad_add.to(x.dtype)
    dw = _cast(_rows_sum(g * xs * r), weight) if needs[0] else None
    db = _rows_sum(g) if needs[1] else None
    ds = _cast((s / n).sum(), scale) if mode == SCALE and needs[2] else None
    return dx, dw, db, ds


def layer_norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor | None, grad_add: Tensor | None, eps: float, needs: tuple[bool, bool]
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias) of LayerNorm (Ba et al. 2016) with the statistics recomputed."""
    ct = compute_dtype(x)
    xs, g = x.to(ct), grad.to(ct)
    mean = xs.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xs - mean).square().mean(-1, keepdim=True) + eps)
    xhat = (xs - mean) * rstd
    gw = g * weight.to(ct) if weight is not None else g
    dx = (rstd * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))).to(x.dtype)
    if grad_add is not None:
        dx = dx + grad_add.to(x.dtype)
    dw = _cast(_rows_sum(g * xhat), weight) if needs[0] else None
    db = _rows_sum(g) if needs[1] else None
    return dx, dw, db


def dyt_backward(
    grad: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, needs: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dalpha, dweight, dbias) of ``w * tanh(alpha x) + b`` (Zhu et al. 2025)."""
    ct = compute_dtype(x)
    xs, g, al = x.to(ct), grad.to(ct), alpha.to(ct)
    t = torch.tanh(al * xs)
    q = (g * weight.to(ct) if weight is not None else g) * (1 - t.square())
    dx = (al * q).to(x.dtype)
    da = _cast((q * xs).sum(), alpha) if needs[0] else None
    dw = _cast(_rows_sum(g * t), weight) if needs[1] else None
    db = _rows_sum(g) if needs[2] else None
    return dx, da, dw, db
