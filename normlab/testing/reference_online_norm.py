"""Float64 references of Online Normalization (https://arxiv.org/abs/1905.05894): the forward streams and the
backward control processes, written sample by sample and channel by channel from the recursions, independently of
:mod:`normlab.functional.online_norm`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.registry import register_reference
from normlab.testing.reference_evo_norm import channel_affine

__all__ = ["online_norm", "online_norm_backward", "online_normalize"]


def online_normalize(m: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward of the normalization alone: ``(y, scales (N, C), final μ, final σ²)``, no state touched."""
    x = x.to(torch.float64)
    n, c = x.shape[:2]
    rows = x.reshape(n, c, -1)
    mean = [float(v) for v in m.running_mean.detach().double()]
    var = [float(v) for v in m.running_var.detach().double()]
    a = m.alpha_fwd
    y = torch.empty_like(rows)
    scales = torch.empty(n, c, dtype=torch.float64)
    for t in range(n):
        for ch in range(c):
            vals = rows[t, ch]
            s = (var[ch] + m.eps) ** 0.5
            y[t, ch] = (vals - mean[ch]) / s
            scales[t, ch] = s
            mt = float(vals.sum()) / vals.numel()
            qt = float(((vals - mt) ** 2).sum()) / vals.numel()
            d = mt - mean[ch]
            var[ch] = a * var[ch] + (1 - a) * qt + a * (1 - a) * d * d
            mean[ch] = mean[ch] + (1 - a) * d
    return (y.reshape(x.shape), scales, torch.tensor(mean, dtype=torch.float64),
            torch.tensor(var, dtype=torch.float64))


def _ecm(m: Any, y: Tensor) -> Tensor:
    if m.ecm == "ac":
        return y.clamp(-5.0, 5.0)
    if m.ecm == "ls":
        return y / torch.sqrt((y**2).mean(tuple(range(1, y.dim())), keepdim=True) + m.eps)
    return y


@register_reference("online_norm")
def online_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    x = x.to(torch.float64)
    if m.training:
        y = online_normalize(m, x)[0]
    else:
        shape = [1, -1] + [1] * (x.dim() - 2)
        mu = m.running_mean.detach().double().reshape(shape)
        y = (x - mu) / torch.sqrt(m.running_var.detach().double().reshape(shape) + m.eps)
    return _ecm(m, channel_affine(y, m))


def online_norm_backward(m: Any, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The input gradient of the training normalization for the gradient ``delta`` at its output ``y`` (before the
    affine and the ECM), and the control processes ``(u, v)`` after it, from the paper's Algorithm 1."""
    y, scales, _, _ = online_normalize(m, x)
    n, c = y.shape[:2]
    y3, d3 = y.reshape(n, c, -1), delta.to(torch.float64).reshape(n, c, -1)
    u = [float(t) for t in m.control_u.detach().double()]
    v = [float(t) for t in m.control_v.detach().double()]
    k = 1 - m.alpha_bkw
    out = torch.empty_like(d3)
    for t in range(n):
        for ch in range(c):
            dprime = d3[t, ch] - k * v[ch] * y3[t, ch]
            v[ch] += float((dprime * y3[t, ch]).mean())
            gx = dprime / scales[t, ch] - k * u[ch]
            u[ch] += float(gx.mean())
            out[t, ch] = gx
    return out.reshape(y.shape), torch.tensor(u, dtype=torch.float64), torch.tensor(v, dtype=torch.float64)
