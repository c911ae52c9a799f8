"""Functional Unified Normalization (Yang et al., "Unified Normalization for Accelerating and Stabilizing
Transformers", ACM MM 2022, https://arxiv.org/abs/2208.01313) with the official UN1d semantics
(hikvision-research/Unified-Normalization @ 0ce9bf26).

Training uses an ``autograd.Function`` whose backward is the official smoothed/calibrated gradient.
See :class:`normlab.nn.UnifiedNorm`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.functional._checks import affine_in, apply_affine
from normlab.functional._dist import all_reduce_sum_, check_count, second_moment, stats_group
from normlab.functional.batch_norm import divide_by_running, token_stats_input

__all__ = ["unified_grad_step", "unified_norm", "unified_step"]

_R_MIN, _R_MAX = 0.2, 5.0  # clamp of the calibration ratio r
_R_FREE_ITERS = 1000  # r == 1 while t <= max(1000, warmup_iters)


class _UnifiedFunction(torch.autograd.Function):
    """``y = weight * x / sqrt(v + eps) + bias`` with UN's smoothed, calibrated backward (Yang et al. 2022,
    gradient smoothing and calibration, as the official ``UN1d`` code computes it)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, inv_std: Tensor, r: Tensor,
        state: dict[str, Any],
    ) -> Tensor:
        z = x * inv_std
        y = apply_affine(z, weight, bias)
        ctx.save_for_backward(z, inv_std, r, weight)
        ctx.state, ctx.has_bias = state, bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        z, inv_std, r, weight = ctx.saved_tensors
        st = ctx.state
        c = z.shape[-1]
        g = dy * r if weight is None else dy * (weight * r)
        # gz: mean over ALL positions (padding included, every rank) of g * z.
        gz = all_reduce_sum_((g * z).reshape(-1, c).sum(0), st["group"]) / st["positions"].clamp_min(1.0)
        g_tilde = g - unified_grad_step(gz, st) * z
        dx = g_tilde * inv_std
        dw = (dy * (r * z)).reshape(-1, c).sum(0) if weight is not None and ctx.needs_input_grad[1] else None
        db = dy.reshape(-1, c).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None


@torch.no_grad()
def unified_grad_step(gz: Tensor, st: dict[str, Any]) -> Tensor:
    """The backward's gradient smoothing: writes ``gz`` (the batch mean of ``g * z``) into the window ``buffer_gz``,
    updates ``ema_gz`` in place and returns the per-channel coefficient ``c`` of ``g~ = g - c z``."""
    buffer_gz: Tensor = st["buffer_gz"]
    ema_gz: Tensor = st["ema_gz"]
    t, k, skip, momentum = st["t"], buffer_gz.shape[0], st["skip"], st["momentum"]
    old_ema = ema_gz.to(gz.dtype, copy=True)  # ema_gz is overwritten below
    buffer_gz[t % k] = (old_ema if skip else gz).to(buffer_gz.dtype)
    m = gz if (t <= k or t < st["warmup_iters"] or skip) else buffer_gz.to(gz.dtype).mean(0)
    new_ema = momentum * old_ema + (1.0 - momentum) * m
    ema_gz.copy_(new_ema.to(ema_gz.dtype))
    return m if skip else new_ema


def _pooled_unbiased_var(t: Tensor) -> Tensor:
    n = t.numel()
    if n <= 1:  # the official torch.var of one entry is NaN; no comparison with NaN is true
        return torch.full((), float("nan"), dtype=t.dtype, device=t.device)
    return ((t - t.mean()).square().sum() / (n - 1)).to(t.dtype)


def _geometric_mean(window: Tensor) -> Tensor:
    return torch.exp(torch.log(window).mean(0))


def unified_norm(
    x: Tensor, num_features: int, running_var: Tensor, buffer_x2: Tensor, buffer_gz: Tensor, ema_gz: Tensor,
    iters: Tensor, skip_counter: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
    training: bool = False, eps: float = 1e-5, momentum: float = 0.9, warmup_iters: int = 4000,
    outlier_filtration: bool = False, channel_dim: int = -1, mask: Tensor | None = None, process_group: Any = None,
    sync_stats: bool = True,
) -> Tensor:
    """Unified Normalization on token tensors ``(*, C)``. In training it increments ``iters``, writes the window
    ``buffer_x2``, ``running_var`` and ``skip_counter`` in place (and ``buffer_gz``/``ema_gz`` in the backward).
    The window sizes are ``buffer_x2.shape[0]`` (forward) and ``buffer_gz.shape[0]`` (backward).
    See :class:`normlab.nn.UnifiedNorm`.
    """
    op = "unified_norm"
    mask, xs = token_stats_input(x, num_features, channel_dim, mask, op)
    ct = xs.dtype
    if not training:
        return divide_by_running(xs, running_var, eps, weight, bias, x.dtype)
    w, b = affine_in(ct, weight, bias)

    group = stats_group(process_group, sync_stats)
    count, x2, positions = second_moment(xs.detach().reshape(-1, num_features), mask, group)
    check_count(count, op, x, mask, group)
    inv_std, r, t, skip = unified_step(x2, running_var, buffer_x2, iters, skip_counter, eps, momentum, warmup_iters,
                                       outlier_filtration)
    state = {
        "buffer_gz": buffer_gz,
        "ema_gz": ema_gz,
        "t": t,
        "skip": skip,
        "momentum": momentum,
        "warmup_iters": warmup_iters,
        "group": group,
        "positions": positions,
    }
    y = _UnifiedFunction.apply(xs, w, b, inv_std, r, state)
    return y.to(x.dtype)


@torch.no_grad()
def unified_step(x2: Tensor, running_var: Tensor, buffer_x2: Tensor, iters: Tensor, skip_counter: Tensor, eps: float,
                 momentum: float, warmup_iters: int, outlier_filtration: bool) -> tuple[Tensor, Tensor, int, bool]:
    """One training step's forward statistics from the batch quadratic mean ``x2`` (compute dtype): updates
    ``iters``, the window ``buffer_x2``, ``running_var`` and ``skip_counter`` in place; returns ``(inv_std, r, t,
    skip)``: the divisor, the gradient calibration ratio, the step and whether the batch was filtered out."""
    ct = x2.dtype
    iters.add_(1)
    t = int(iters.item())
    k = buffer_x2.shape[0]
    window = buffer_x2.to(ct)
    rho = _pooled_unbiased_var(torch.sqrt(window))  # before the current batch is inserted
    window[t % k] = x2
    skip = k <= 1
    if t >= warmup_iters and outlier_filtration:
        am, gm = window.mean(0), _geometric_mean(window)
        if bool((am - gm > rho * k).any()):
            window[t % k] = running_var.to(ct)
            skip = True
            skip_counter.add_(1)
    buffer_x2.copy_(window.to(buffer_x2.dtype))
    v = x2 if (t <= k or t < warmup_iters or skip) else _geometric_mean(window)
    old_running = running_var.to(ct)
    if t <= max(_R_FREE_ITERS, warmup_iters) or skip:
        r = torch.ones_like(v)
    else:
        r = (torch.sqrt(v + eps) / torch.sqrt(old_running + eps)).clamp(_R_MIN, _R_MAX)
    running_var.copy_((momentum * old_running + (1.0 - momentum) * v).to(running_var.dtype))
    inv_std = torch.rsqrt(v + eps)
    return inv_std, r, t, skip
