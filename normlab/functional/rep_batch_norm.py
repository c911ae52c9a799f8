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

from normlab.functional._checks import apply_affine, check_channels, compute_dtype
from normlab.functional.batch_norm import batch_statistics, check_mask, token_stats_input

__all__ = ["prep_batch_norm", "prep_lambda", "rep_batch_norm"]


def rep_batch_norm(
    x: Tensor, num_features: int, alpha: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False, momentum: float | None = 0.1,
    eps: float = 1e-5, channel_dim: int = -1, mask: Tensor | None = None, num_batches_tracked: Tensor | None = None,
    process_group: Any = None, sync_stats: bool = True,
) -> Tensor:
    """RepBN: ``batch_norm(x) + alpha * x`` (one rounding to the input dtype). See :class:`normlab.nn.RepBatchNorm`."""
    op = "rep_batch_norm"
    cd = check_channels(x, num_features, channel_dim, op, min_dim=2)
    mask = check_mask(mask, x, cd, op)
    if not training and running_mean is not None and x.numel() == 0:
        return x.clone()
    xs = x.to(compute_dtype(x)).movedim(cd, -1)
    mean, var = batch_statistics(
        xs.reshape(-1, num_features), mask, x_shape=list(x.shape), training=training, running_mean=running_mean,
        running_var=running_var, momentum=momentum, num_batches_tracked=num_batches_tracked,
        process_group=process_group, sync_stats=sync_stats, op=op,
    )
    y = apply_affine((xs - mean) * torch.rsqrt(var + eps), weight, bias) + alpha.to(xs.dtype) * xs
    return y.movedim(-1, cd).to(x.dtype)


def prep_lambda(warm: Tensor, iter: Tensor, total_step: Tensor, r0: float) -> float:
    """The LayerNorm weight λ the next training forward uses: 1 during the warm phase, else ``r0·iter/total``."""
    if int(warm) > 0:
        return 1.0
    return r0 * int(iter) / max(int(total_step), 1)


def prep_batch_norm(
    x: Tensor, num_features: int, norm1: Callable[[Tensor], Tensor], norm2: Callable[..., Tensor], warm: Tensor,
    iter: Tensor, total_step: Tensor, num_step: Tensor, r0: float = 1.0, decrement_every: int = 1,
    training: bool = False, channel_dim: int = -1, mask: Tensor | None = None,
) -> Tensor:
    """PRepBN (SLAB's LinearNorm) on token tensors ``(*, C)``: eval = RepBN; training = LN during the warm phase,
    then ``λ·norm1(x) + (1−λ)·norm2(x)`` with λ = ``r0·iter/total_step`` read before ``iter`` is decremented.

    ``norm1`` is the per-token norm of the LN branch, called as ``norm1(x)``; ``norm2`` the RepBN branch, called as
    ``norm2(x, mask=mask)`` (a :class:`normlab.nn.RepBatchNorm` in the same train/eval mode as ``training``, or any
    callable). Both get ``x`` in its compute dtype, so the output is rounded to the input dtype once.

    Training updates the schedule buffers in place: every forward increments ``num_step``; every
    ``decrement_every``-th forward (``num_step % decrement_every == 0`` after the increment) also decrements ``warm``
    (warm phase) or ``iter`` (ramp, if > 0), so each λ value holds for ``decrement_every`` forwards.
    See :class:`normlab.nn.PRepBatchNorm`.
    """
    mask, xs = token_stats_input(x, num_features, channel_dim, mask, "prep_batch_norm")
    if not training:
        return norm2(xs, mask=mask).to(x.dtype)
    in_warm = int(warm) > 0
    lam = prep_lambda(warm, iter, total_step, r0)
    if in_warm:
        y = norm1(xs)  # the warm phase computes no batch statistics and leaves the BN buffers alone
    else:
        y = lam * norm1(xs) + (1.0 - lam) * norm2(xs, mask=mask)
    # Advance the schedule only once the step succeeded (a refused batch leaves it where it was).
    with torch.no_grad():
        step_now = (int(num_step) + 1) % decrement_every == 0  # the n-th forward of each group of n
        num_step.add_(1)
        if step_now and in_warm:
            warm.sub_(1)
        elif step_now and int(iter) > 0:
            iter.sub_(1)
    return y.to(x.dtype)
