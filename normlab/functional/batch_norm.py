"""Functional BatchNorm (Ioffe & Szegedy 2015, https://arxiv.org/abs/1502.03167) for channel-first tensors
``(N, C, *)`` and token tensors ``(B, N, C)`` with an optional padding mask, synced across ranks under
``torch.distributed`` (``torch.nn.SyncBatchNorm`` semantics) unless ``sync_stats=False``.

See :class:`normlab.nn.BatchNorm`. The pieces (:func:`masked_moments`, :func:`batch_statistics`,
:func:`update_running_stats`, :func:`check_mask`) are reused by RepBN / PRepBN.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab.functional._checks import affine_in, apply_affine, check_channels, compute_dtype, from_compute, to_compute
from normlab.functional._dist import all_reduce_sum, check_rows, check_valid, stats_group

__all__ = ["batch_norm", "batch_statistics", "check_mask", "masked_moments", "update_running_stats"]


def check_mask(mask: Tensor | None, x: Tensor, cd: int, op: str) -> Tensor | None:
    """Validate a padding mask (``True``/1 = valid) whose shape is the input's shape without the channel axis."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{op}: expected mask to be a torch.Tensor or None, got {type(mask).__name__}")
    expected = list(x.shape[:cd]) + list(x.shape[cd + 1 :])
    if list(mask.shape) != expected:
        raise ValueError(
            f"{op}: expected mask of size {expected} (the input's size without channel axis {cd}), "
            f"got mask of size {list(mask.shape)}"
        )
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{op}: expected a bool or integer mask (True/1 = valid token), got dtype {mask.dtype}")
    return mask


def masked_moments(flat: Tensor, mask: Tensor | None, group: Any | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(count, mean, biased var)`` of ``flat`` (T, C) over the rows where ``mask`` (T,) is valid.

    Two-pass (mean, then centred second moment) to avoid the cancellation of ``E[x^2] - E[x]^2``. With a process
    ``group`` the sums and counts are all-reduced (differentiably) so every rank gets the statistics of all ranks'
    rows; a rank with no valid rows contributes zeros.
    """
    if group is None:
        if mask is None:
            var, mean = torch.var_mean(flat, dim=0, correction=0)
            return torch.tensor(float(flat.shape[0]), dtype=flat.dtype, device=flat.device), mean, var
        w = mask.reshape(-1, 1).to(flat.dtype)
        count = w.sum()
        denom = count.clamp_min(1.0)
        mean = (flat * w).sum(0) / denom
        var = ((flat - mean).square() * w).sum(0) / denom
        return count, mean, var
    valid: Tensor | None = None
    if mask is None:
        local_sum = flat.sum(0)
        local_count = torch.full((1,), float(flat.shape[0]), dtype=flat.dtype, device=flat.device)
    else:
        valid = mask.reshape(-1, 1).to(flat.dtype)
        local_sum = (flat * valid).sum(0)
        local_count = valid.sum().reshape(1)
    total = all_reduce_sum(torch.cat([local_sum, local_count]), group)
    count = total[-1].detach()
    denom = count.clamp_min(1.0)
    mean = total[:-1] / denom
    sq = (flat - mean).square()
    var = all_reduce_sum((sq if valid is None else sq * valid).sum(0), group) / denom
    return count, mean, var


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: Tensor, momentum: float | None,
    num_batches_tracked: Tensor | None,
) -> None:
    """torch.nn.BatchNorm's update: EMA with ``momentum`` (cumulative average when ``None``), unbiased variance."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("batch_norm: momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / float(num_batches_tracked.item())
    else:
        factor = momentum
    unbiased = var * (count / (count - 1.0).clamp_min(1.0))
    _ema_(running_mean, mean.detach(), factor)
    _ema_(running_var, unbiased.detach(), factor)


def _ema_(buf: Tensor, new: Tensor, factor: float) -> None:
    """``buf <- (1 - factor) * buf + factor * new`` in ``new``'s (statistics) dtype, rounded once into ``buf``."""
    if buf.dtype == new.dtype:
        buf.mul_(1.0 - factor).add_(new, alpha=factor)
    else:  # e.g. fp16 buffers of a half module: update in float32, round once (in-place fp16 steps round twice)
        buf.copy_(buf.to(new.dtype).mul_(1.0 - factor).add_(new, alpha=factor))


def batch_statistics(
    flat: Tensor, mask: Tensor | None, *, x_shape: list[int], training: bool, running_mean: Tensor | None,
    running_var: Tensor | None, momentum: float | None, num_batches_tracked: Tensor | None, process_group: Any = None,
    sync_stats: bool = True, op: str = "batch_norm",
) -> tuple[Tensor, Tensor]:
    """The ``(mean, var)`` a BatchNorm-type norm normalizes ``flat`` (T, C) with, in ``flat``'s dtype.

    Batch statistics (over valid rows; across the ranks of ``process_group`` in training) when ``training`` or
    when no running buffers are given, updating the running buffers in training; else the running buffers.
    """
    if not (training or running_mean is None or running_var is None):
        assert running_mean is not None and running_var is not None  # narrowed above; for mypy
        return running_mean.to(flat.dtype), running_var.to(flat.dtype)
    # Sync only in training, as torch.nn.SyncBatchNorm: an eval-mode collective could deadlock ranks that
    # evaluate different numbers of batches.
    group = stats_group(process_group, sync_stats) if training else None
    if mask is None and group is None:
        check_rows(flat.shape[0], op, x_shape)
    count, mean, var = masked_moments(flat, mask, group)
    if mask is not None or group is not None:
        check_valid(count, op, x_shape, mask, group)
    if training and running_mean is not None and running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
    return mean, var


def _native(
    xs: Tensor, flat: Tensor, cd: int, mean: Tensor | None, var: Tensor | None, weight: Tensor | None,
    bias: Tensor | None, training: bool, momentum: float, eps: float, /,
) -> Tensor:
    """torch's BatchNorm kernel on a contiguous layout: ``(N, C, *)`` as is, token tensors as their ``(T, C)`` rows.

    A transposed view of a token tensor sends the kernel down a strided path several times slower
    (measured 2026-11-23 on CPU: 6x torch.nn.BatchNorm1d at 8192x1024).
    """
    w, b = affine_in(xs.dtype, weight, bias)
    if cd == 1 or flat.data_ptr() != xs.data_ptr() or not flat.is_contiguous():
        x_cf = xs.movedim(-1, 1)
        return F.batch_norm(x_cf, mean, var, w, b, training, momentum, eps).movedim(1, cd)
    return F.batch_norm(flat, mean, var, w, b, training, momentum, eps).reshape(xs.shape).movedim(-1, cd)


def token_stats_input(
    x: Tensor, num_features: int, channel_dim: int, mask: Tensor | None, op: str
) -> tuple[Tensor | None, Tensor]:
    """Validate the input of a token-only batch-statistic op (``(*, C)``, ``channel_dim=-1``) and its mask; return the
    mask and ``x`` in its compute dtype."""
    cd = check_channels(x, num_features, channel_dim, op, min_dim=2)
    if cd != x.dim() - 1:
        raise ValueError(f"{op}: works on token tensors (*, C); expected channel_dim=-1, got {channel_dim}")
    return check_mask(mask, x, cd, op), x.to(compute_dtype(x))


def divide_by_running(
    xs: Tensor, running: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """The eval form of a norm that divides by a running quadratic mean: ``γ·x/sqrt(running + eps) + β``."""
    return apply_affine(xs * torch.rsqrt(running.to(xs.dtype) + eps), weight, bias).to(out_dtype)


def batch_norm(
    x: Tensor, num_features: int, running_mean: Tensor | None = None, running_var: Tensor | None = None,
    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False, momentum: float | None = 0.1,
    eps: float = 1e-5, channel_dim: int = 1, mask: Tensor | None = None, num_batches_tracked: Tensor | None = None,
    process_group: Any = None, sync_stats: bool = True,
) -> Tensor:
    """BatchNorm over every axis but ``channel_dim``; with ``mask``, batch statistics use valid positions only.

    Batch statistics are used when ``training`` or when no running buffers are given; running buffers are
    updated in place in training mode. In training under an initialised ``torch.distributed`` the statistics
    are all-reduced over ``process_group`` (WORLD when ``None``) unless ``sync_stats=False``.
    """
    op = "batch_norm"
    cd = check_channels(x, num_features, channel_dim, op, min_dim=2)
    mask = check_mask(mask, x, cd, op)
    ct = compute_dtype(x)
    use_batch_stats = training or running_mean is None or running_var is None
    xs = to_compute(x, cd)
    if not use_batch_stats and x.numel() == 0:
        return x.clone()
    flat = xs.reshape(-1, num_features)
    if training and mask is None and stats_group(process_group, sync_stats) is None and flat.shape[0] > 1:
        # Native kernel for the common single-process, unmasked training case: the same statistics and the
        # same running-stat update (unbiased variance, momentum or cumulative factor) as the general path.
        # Without running buffers momentum is unused (torch accepts momentum=None there too).
        factor = momentum
        if running_mean is not None and running_var is not None:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                if momentum is None:
                    factor = 1.0 / float(num_batches_tracked.item())
            elif momentum is None:
                raise ValueError(f"{op}: momentum=None (cumulative average) needs num_batches_tracked")
        # torch's kernel wants running buffers in the compute dtype: a half module's buffers go in as float32
        # copies (statistics in float32) and the updated values are rounded back into the buffers.
        rm, rv = running_mean, running_var
        upcast = rm is not None and rv is not None and rm.dtype != ct
        if upcast:
            rm, rv = rm.to(ct) if rm is not None else None, rv.to(ct) if rv is not None else None
        y = _native(xs, flat, cd, rm, rv, weight, bias, True, 0.0 if factor is None else factor, eps)
        if upcast:
            for buf, new in ((running_mean, rm), (running_var, rv)):
                if buf is not None and new is not None:
                    buf.copy_(new)
        return y.to(x.dtype)
    mean, var = batch_statistics(
        flat, mask, x_shape=list(x.shape), training=training, running_mean=running_mean, running_var=running_var,
        momentum=momentum, num_batches_tracked=num_batches_tracked, process_group=process_group,
        sync_stats=sync_stats, op=op,
    )
    if mask is None and not use_batch_stats:
        # Native kernel for the common eval case; identical maths to the expression below.
        return _native(xs, flat, cd, mean, var, weight, bias, False, 0.0, eps).to(x.dtype)
    return from_compute(apply_affine((xs - mean) * torch.rsqrt(var + eps), weight, bias), x, cd)
