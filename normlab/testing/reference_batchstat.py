"""Float64 references of the Transformer batch-statistic norms: PowerNorm (https://arxiv.org/abs/2003.07845),
Unified Normalization (https://arxiv.org/abs/2208.01313), RepBN and PRepBN (SLAB, https://arxiv.org/abs/2405.11582).

Written from the papers and the official code (the commits named in each norm's module), independently of
:mod:`normlab.functional`. Each has the signature
``reference(module, x, mask=None) -> Tensor``: it reads the module's parameters, buffers and ``training`` flag and
returns the output of the module's NEXT forward (in training: the step ``t = iters + 1``) without updating state.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from normlab.registry import get_norm, register_reference
from normlab.testing.reference import affine64, to64

__all__ = ["power_norm", "prep_batch_norm", "rep_batch_norm", "unified_norm"]


def _valid_rows(xl: Tensor, mask: Tensor | None) -> Tensor:
    rows = xl.reshape(-1, xl.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).bool()]


def _group_rms(x: Tensor, groups: int, eps: float = 1e-5) -> Tensor:
    c = x.shape[-1]
    parts = []
    for g in range(groups):
        chunk = x[..., g * (c // groups) : (g + 1) * (c // groups)]
        parts.append(chunk / torch.sqrt((chunk**2).mean(-1, keepdim=True) + eps))
    return torch.cat(parts, dim=-1)


@register_reference("power_norm")
def power_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """GroupScaling, then the batch quadratic mean while ``t <= warmup_iters``, else the old ``running_phi``."""
    xg = x.to(torch.float64)
    if m.group_num is not None:
        xg = _group_rms(xg, m.group_num)
    if m.training and int(m.iters) + 1 <= m.warmup_iters:
        stat = (_valid_rows(xg, mask) ** 2).mean(0)
    else:
        stat = to64(m.running_phi)
    return affine64(xg / torch.sqrt(stat + m.eps), m)


@register_reference("unified_norm")
def unified_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """The statistic step ``t = iters + 1`` would use (batch moment / window geometric mean / outlier fallback)."""
    xd = x.to(torch.float64)
    if not m.training:
        return affine64(xd / torch.sqrt(to64(m.running_var) + m.eps), m)
    t = int(m.iters) + 1
    k = m.buffer_x2.shape[0]
    x2 = (_valid_rows(xd, mask) ** 2).mean(0)
    window = m.buffer_x2.detach().to(torch.float64).clone()
    roots = torch.sqrt(window).reshape(-1)
    n = roots.numel()
    rho = ((roots - roots.mean()) ** 2).sum() / (n - 1) if n > 1 else torch.tensor(math.nan, dtype=torch.float64)
    window[t % k] = x2
    outlier = False
    if m.outlier_filtration and t >= m.warmup_iters:
        am = window.mean(0)
        gm = torch.exp(torch.log(window).mean(0))
        outlier = bool(((am - gm) > rho * k).any())
    if t <= k or t < m.warmup_iters or outlier or k <= 1:
        v = x2
    else:
        v = torch.exp(torch.log(window).mean(0))
    return affine64(xd / torch.sqrt(v + m.eps), m)


def _rep_bn(m: Any, xl: Tensor, mask: Tensor | None, training: bool) -> Tensor:
    """RepBN on a channel-last float64 tensor."""
    if training:
        rows = _valid_rows(xl, mask)
        mu = rows.mean(0)
        var = ((rows - mu) ** 2).mean(0)
    else:
        mu, var = to64(m.running_mean), to64(m.running_var)
    bn = affine64((xl - mu) / torch.sqrt(var + m.eps), m)
    return bn + to64(m.alpha) * xl


@register_reference("rep_batch_norm")
def rep_batch_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    xl = x.to(torch.float64).movedim(m.channel_dim, -1)
    return _rep_bn(m, xl, mask, m.training).movedim(-1, m.channel_dim)


@register_reference("prep_batch_norm")
def prep_batch_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Eval: RepBN. Training: norm1 in the warm phase, else ``λ·norm1 + (1−λ)·RepBN`` with λ = r0·iter/total."""
    xd = x.to(torch.float64)
    if not m.training:
        return _rep_bn(m.norm2, xd, mask, False)
    ln = get_norm(type(m.norm1)).reference(m.norm1, xd)
    if int(m.warm) > 0:
        return ln
    total = int(m.total_step)
    lam = m.r0 * int(m.iter) / total if total > 0 else 0.0
    return lam * ln + (1.0 - lam) * _rep_bn(m.norm2, xd, mask, True)
