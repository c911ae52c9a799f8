"""Cross-rank reductions for batch-statistic norms (BatchNorm, RepBN/PRepBN, PowerNorm, Unified Normalization).

Under an initialised ``torch.distributed`` the per-channel sums and counts a norm needs are all-reduced, so that
N ranks with b sequences each compute the statistics of all N*b sequences (what ``torch.nn.SyncBatchNorm`` does
for BatchNorm). PowerNorm's official code leaves its statistics per rank (sIncerass/powernorm issue #15,
https://arxiv.org/abs/2003.07845) and so does Unified Normalization's; syncing them is this library's addition.

:func:`all_reduce_sum` is differentiable: its backward all-reduces the incoming gradient, because on every rank the
loss depends on the global sum, so the gradient of the summed loss with respect to one rank's contribution is the
sum of all ranks' gradients with respect to the global sum.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sum", "all_reduce_sum_", "check_count", "second_moment", "stats_group", "world_size"]


def stats_group(process_group: Any, sync_stats: bool) -> Any | None:
    """The process group to all-reduce statistics over, or ``None`` when nothing is synced.

    ``None`` is returned when ``sync_stats`` is false, when ``torch.distributed`` is unavailable or not
    initialised, or when the group has a single rank. ``process_group=None`` means the WORLD group.
    """
    if not sync_stats or not dist.is_available() or not dist.is_initialized():
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def world_size(group: Any | None) -> int:
    """Ranks in ``group`` (1 when ``group`` is ``None``)."""
    return 1 if group is None else int(dist.get_world_size(group))


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = t.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(t: Tensor, group: Any | None) -> Tensor:
    """Differentiable sum of ``t`` over the ranks of ``group``; ``t`` itself when ``group`` is ``None``."""
    if group is None:
        return t
    return _AllReduceSum.apply(t, group)


@torch.no_grad()
def all_reduce_sum_(t: Tensor, group: Any | None) -> Tensor:
    """In-place, non-differentiable sum over ``group`` (for statistics used inside a custom backward)."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


@torch.no_grad()
def second_moment(flat: Tensor, mask: Tensor | None, group: Any | None) -> tuple[Tensor, Tensor, Tensor]:
    """Detached per-channel quadratic mean ``q_c = mean x_c^2`` of ``flat`` (T, C) over valid rows, across ranks.

    Returns ``(count, q, positions)``: the number of valid rows, ``q`` and the number of rows, padding included
    (PowerNorm's and UN's backward average over every position), all summed over ``group``'s ranks in one
    all-reduce. A rank with no valid rows contributes zeros; ``q`` is 0 when no rank has a valid row.
    """
    sq = flat.square()
    if mask is None:
        local_sum = sq.sum(0)
        local_count = torch.tensor(float(flat.shape[0]), dtype=flat.dtype, device=flat.device)
    else:
        valid = mask.reshape(-1, 1).to(flat.dtype)
        local_sum = (sq * valid).sum(0)
        local_count = valid.sum()
    packed = torch.cat(
        [
            local_sum,
            local_count.reshape(1),
            torch.full((1,), float(flat.shape[0]), dtype=flat.dtype, device=flat.device),
        ]
    )
    all_reduce_sum_(packed, group)
    count, positions = packed[-2], packed[-1]
    return count, packed[:-2] / count.clamp_min(1.0), positions


def check_rows(rows: int, op: str, x_shape: list[int]) -> None:
    """Refuse batch statistics of fewer than 2 values per channel (no mask, one process): checked before they are
    computed, since the variance of one value has no degrees of freedom."""
    if rows <= 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got input of size {x_shape}")


def check_valid(count: Tensor, op: str, x_shape: list[int], mask: Tensor | None, group: Any | None) -> None:
    """Refuse masked or cross-rank batch statistics of fewer than 2 valid values per channel (``count`` is the global
    count, the same on every rank)."""
    if torch.compiler.is_compiling():
        return
    n_valid = int(count.item())
    if n_valid <= 1:
        where = f"a mask of size {list(mask.shape)}" if mask is not None else f"an input of size {x_shape}"
        ranks = f" summed over {world_size(group)} ranks" if group is not None else ""
        raise ValueError(
            f"{op}: expected more than 1 valid (unmasked) value per channel when training, got {n_valid} "
            f"valid positions in {where}{ranks}"
        )


def check_count(count: Tensor, op: str, x: Tensor, mask: Tensor | None, group: Any | None) -> None:
    """Refuse batch statistics of fewer than 2 values per channel of a token tensor ``x`` ``(*, C)``."""
    if mask is None and group is None:
        check_rows(x.numel() // max(x.shape[-1], 1) if x.dim() else 0, op, list(x.shape))
    else:
        check_valid(count, op, list(x.shape), mask, group)
