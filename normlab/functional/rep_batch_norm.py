"""Functional RepBN and progressive PRepBN (Guo et al., "SLAB: Efficient Transformers with Simplified Linear
Attention and Progressive Re-parameterized Batch Normalization", ICML 2024, https://arxiv.org/abs/2405.11582).

RepBN is BatchNorm plus a learnable scalar skip ``alpha * x``; PRepBN trains with ``λ·LN(x) + (1−λ)·RepBN(x)``
while λ ramps linearly from ``r0`` to 0. The batch statistics reuse :mod:`normlab.functional.batch_norm`
(masks, running-stat update, cross-rank sync). See :class:`normlab.nn.RepBatchNorm` / :class:`normlab.nn.PRepBatchNorm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from normlab.functional._checks import check_channels, compute_dtype
from normlab.functional.batch_norm import batch_statistics, check_mask

__all__ = ["prep_batch_norm", "prep_lambda", "rep_batch_norm"]


def _rep_channel_last(
    xs: Tensor,
    mask: Tensor | None,
    x_shape: list[int],
    num_features: int,
    alpha: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    process_group: Any,
    sync_stats: bool,
    op: str,
) -> Tensor:
    """RepBN of a channel-last tensor in its (compute) dtype: ``BN(xs) + alpha * xs``."""
    ct = xs.dtype
    mean, var = batch_statistics(
        xs.reshape(-1, num_features), mask, x_shape=x_shape, training=training, running_mean=running_mean,
        running_var=running_var, momentum=momentum, num_batches_tracked=num_batches_tracked,
        process_group=process_group, sync_stats=sync_stats, op=op,
    )
    y = (xs - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y + alpha.to(ct) * xs


def rep_batch_norm(
    x: Tensor,
    num_features: int,
    alpha: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    channel_dim: int = -1,
    mask: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    process_group: Any = None,
    sync_stats: bool = True,
) -> Tensor:
    """RepBN: ``batch_norm(x) + alpha * x`` (one rounding to the input dtype). See :class:`normlab.nn.RepBatchNorm`."""
    op = "rep_batch_norm"
    cd = check_channels(x, num_features, channel_dim, op, min_dim=2)
    mask = check_mask(mask, x, cd, op)
    if not training and running_mean is not None and x.numel() == 0:
        return x.clone()
    xs = x.to(compute_dtype(x)).movedim(cd, -1)
    y = _rep_channel_last(
        xs, mask, list(x.shape), num_features, alpha, running_mean, running_var, weight, bias, training, momentum,
        eps, num_batches_tracked, process_group, sync_stats, op,
    )
    return y.movedim(-1, cd).to(x.dtype)


def prep_lambda(warm: Tensor, iter: Tensor, total_step: Tensor, r0: float) -> float:
    """The LayerNorm weight λ the next training forward uses: 1 during the warm phase, else ``r0·iter/total``."""
    if int(warm) > 0:
        return 1.0
    return r0 * int(iter) / max(int(total_step), 1)


def prep_batch_norm(
    x: Tensor,
    num_features: int,
    norm1: Callable[[Tensor], Tensor],
    alpha: Tensor,
    warm: Tensor,
    iter: Tensor,
    total_step: Tensor,
    num_step: Tensor,
    r0: float = 1.0,
    decrement_every: int = 1,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    channel_dim: int = -1,
    mask: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    process_group: Any = None,
    sync_stats: bool = True,
) -> Tensor:
    """PRepBN (SLAB's LinearNorm) on token tensors ``(*, C)``: eval = RepBN; training = LN during the warm phase,
    then ``λ·norm1(x) + (1−λ)·RepBN(x)`` with λ = ``r0·iter/total_step`` read before ``iter`` is decremented.

    Training updates the schedule buffers in place: every forward increments ``num_step``; every
    ``decrement_every``-th forward (``num_step % decrement_every == 0`` after the increment) also decrements ``warm``
    (warm phase) or ``iter`` (ramp, if > 0), so each λ value holds for ``decrement_every`` forwards.
    ``norm1`` is the per-token norm of the LN branch (a module or any callable).
    See :class:`normlab.nn.PRepBatchNorm`.
    """
    op = "prep_batch_norm"
    cd = check_channels(x, num_features, channel_dim, op, min_dim=2)
    if cd != x.dim() - 1:
        raise ValueError(f"{op}: works on token tensors (*, C); expected channel_dim=-1, got {channel_dim}")
    mask = check_mask(mask, x, cd, op)
    xs = x.to(compute_dtype(x))
    rep_args = (
        mask, list(x.shape), num_features, alpha, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked, process_group, sync_stats, op,
    )
    if not training:
        if running_mean is not None and x.numel() == 0:
            return x.clone()
        return _rep_channel_last(xs, *rep_args).to(x.dtype)
    in_warm = int(warm) > 0
    lam = 1.0 if in_warm else r0 * int(iter) / max(int(total_step), 1)
    if in_warm:
        y = norm1(xs)  # the warm phase computes no batch statistics and leaves the BN buffers alone
    else:
        y = lam * norm1(xs) + (1.0 - lam) * _rep_channel_last(xs, *rep_args)
    # Advance the schedule only once the step succeeded (a refused batch leaves it where it was).
    with torch.no_grad():
        step_now = (int(num_step) + 1) % decrement_every == 0  # the n-th forward of each group of n
        num_step.add_(1)
        if step_now and in_warm:
            warm.sub_(1)
        elif step_now and int(iter) > 0:
            iter.sub_(1)
    return y.to(x.dtype)
