"""Functional PowerNorm (Shen et al., "PowerNorm: Rethinking Batch Normalization in Transformers", ICML 2020,
https://arxiv.org/abs/2003.07845) with the official MaskPowerNorm semantics, and GroupScaling.

The training step is an ``autograd.Function`` whose backward is the official approximate recursion (a running
estimate of the mean-gradient projection), not autograd's exact gradient. See :class:`normlab.nn.PowerNorm`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from normlab.functional._checks import affine_in, apply_affine
from normlab.functional._dist import all_reduce_sum_, check_count, second_moment, stats_group
from normlab.functional.batch_norm import divide_by_running, token_stats_input

__all__ = ["group_scaling", "power_norm", "power_step"]

BackwardDivisor = Literal["batch", "forward"]


def group_scaling(x: Tensor, group_num: int, eps: float = 1e-5) -> Tensor:
    """GroupScaling: per token, divide each group of ``C/group_num`` consecutive channels by its root mean square.

    ``x`` is channel-last ``(*, C)``; plain autograd. With ``group_num=1`` this is a weightless RMSNorm.
    """
    c = x.shape[-1]
    if group_num < 1 or c % group_num:
        raise ValueError(f"group_scaling: expected group_num >= 1 dividing the channel count {c}, got {group_num}")
    g = x.reshape(*x.shape[:-1], group_num, c // group_num)
    return (g * torch.rsqrt(g.square().mean(-1, keepdim=True) + eps)).reshape(x.shape)


class _PowerFunction(torch.autograd.Function):
    """``y = weight * x / sqrt(stat + eps) + bias`` with PowerNorm's approximate backward (code form, §2.4)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, inv_fwd: Tensor, inv_bwd: Tensor,
        ema_gz: Tensor, alpha_bkw: float, positions: Tensor, group: Any,
    ) -> Tensor:
        z = x * inv_fwd
        y = apply_affine(z, weight, bias)
        ctx.save_for_backward(z, inv_bwd, weight)
        ctx.ema_gz, ctx.alpha_bkw, ctx.positions, ctx.group = ema_gz, alpha_bkw, positions, group
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        z, inv_bwd, weight = ctx.saved_tensors
        ema_gz: Tensor = ctx.ema_gz
        c = z.shape[-1]
        g = dy * weight if weight is not None else dy
        u = ema_gz.to(z.dtype, copy=True)  # ema_gz is updated in place below
        g_tilde = g - (1.0 - ctx.alpha_bkw) * u * z
        # u <- u + mean over ALL positions (padding included, every rank) of g_tilde * z.
        s = all_reduce_sum_((g_tilde * z).reshape(-1, c).sum(0), ctx.group)
        ema_gz.add_((s / ctx.positions.clamp_min(1.0)).to(ema_gz.dtype))
        dx = g_tilde * inv_bwd
        dw = (dy * z).reshape(-1, c).sum(0) if weight is not None and ctx.needs_input_grad[1] else None
        db = dy.reshape(-1, c).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None


@torch.no_grad()
def power_step(psi2: Tensor, running_phi: Tensor, iters: Tensor, eps: float, alpha_fwd: float, warmup_iters: int,
               backward_divisor: BackwardDivisor) -> tuple[Tensor, Tensor]:
    """One training step's divisors ``(inv_fwd, inv_bwd)`` from the batch quadratic mean ``psi2`` (compute dtype);
    increments ``iters`` and updates ``running_phi`` in place."""
    # Tensor-valued step logic (no .item()): no host sync, and torch.compile(fullgraph=True) can trace it.
    ct = psi2.dtype
    iters.add_(1)
    old_phi = running_phi.to(ct)
    t = iters.to(ct)
    inv_batch = torch.rsqrt(psi2 + eps)
    inv_fwd = torch.where(iters <= warmup_iters, inv_batch, torch.rsqrt(old_phi + eps))
    inv_bwd = inv_batch if backward_divisor == "batch" else inv_fwd
    # Running quadratic mean: a cumulative average during warm-up, then (always) the EMA step. Computed in
    # float32 and rounded once into the buffer's dtype (two in-place fp16 steps would round twice).
    cumulative = old_phi * ((t - 1) / t) + psi2 / t
    new_phi = torch.where(iters < warmup_iters, cumulative, old_phi)
    running_phi.copy_((new_phi * alpha_fwd + (1.0 - alpha_fwd) * psi2).to(running_phi.dtype))
    return inv_fwd, inv_bwd


def power_norm(
    x: Tensor, num_features: int, running_phi: Tensor, ema_gz: Tensor, iters: Tensor, weight: Tensor | None = None,
    bias: Tensor | None = None, training: bool = False, eps: float = 1e-5, alpha_fwd: float = 0.9,
    alpha_bkw: float = 0.9, warmup_iters: int = 10000, group_num: int | None = 1, group_scaling_eps: float = 1e-5,
    backward_divisor: BackwardDivisor = "batch", channel_dim: int = -1, mask: Tensor | None = None,
    process_group: Any = None, sync_stats: bool = True,
) -> Tensor:
    """PowerNorm on token tensors ``(*, C)``; in training it increments ``iters`` and updates ``running_phi`` in
    place (and ``ema_gz`` in the backward). See :class:`normlab.nn.PowerNorm` for the exact semantics.
    """
    op = "power_norm"
    mask, xs = token_stats_input(x, num_features, channel_dim, mask, op)
    ct = xs.dtype
    if group_num is not None:
        xs = group_scaling(xs, group_num, group_scaling_eps)
    if not training:
        return divide_by_running(xs, running_phi, eps, weight, bias, x.dtype)
    w, b = affine_in(ct, weight, bias)

    group = stats_group(process_group, sync_stats)
    flat = xs.detach().reshape(-1, num_features)
    count, psi2, positions = second_moment(flat, mask, group)
    check_count(count, op, x, mask, group)
    inv_fwd, inv_bwd = power_step(psi2, running_phi, iters, eps, alpha_fwd, warmup_iters, backward_divisor)
    y = _PowerFunction.apply(xs, w, b, inv_fwd, inv_bwd, ema_gz, alpha_bkw, positions, group)
    return y.to(x.dtype)
