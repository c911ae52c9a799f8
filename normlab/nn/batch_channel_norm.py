"""Batch-Channel Normalization (Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel Normalization
and Weight Standardization", https://arxiv.org/abs/1903.10520), with the estimated-BN variant for micro-batches."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.functional.batch_channel_norm import batch_channel_norm
from normlab.nn._base import (
    BatchStatView,
    NormBase,
    RecalibrationPlan,
    bn_batch_stat_view,
    bn_recalibration_plan,
    check_unit,
)
from normlab.nn.batch_norm import bn_stats
from normlab.nn.group_norm import resolve_num_groups
from normlab.registry import Paper, register_norm

__all__ = ["BatchChannelNorm"]


@register_norm(
    "batch_channel_norm", functional=batch_channel_norm, layout="channel_first",
    has_running_stats=True, batch_dependent=True, foldable=False,
    aliases=("bcn", "bc_norm", "bcnorm"),
    paper=Paper("Micro-Batch Training with Batch-Channel Normalization and Weight Standardization",
                "https://arxiv.org/abs/1903.10520"),
    # estimate=True is left out: its statistics carry no gradient by design, which gradcheck cannot express; its own
    # test file checks it against the float64 reference (forward, gradient with the estimates held constant).
    samples=({"num_groups": 2}, {"num_groups": 3, "momentum": None}, {"affine": False}),
    description="BatchNorm, then per-sample group normalization with a per-group affine (BCN)",
)
class BatchChannelNorm(NormBase):
    r"""Batch-Channel Normalization: a BatchNorm followed by a channel (group) normalization, ``BCN(x) = CN(BN(x))``.

    Paper: Qiao, Wang, Liu, Shen, Yuille, https://arxiv.org/abs/1903.10520 (Section 4; the official ``BCNorm``).

    .. math:: \dot x = \gamma_c \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon}} + \beta_c, \qquad
              y = a_g \frac{\dot x - \mathrm{E}_{n,g}[\dot x]}{\sqrt{\mathrm{Var}_{n,g}[\dot x] + \epsilon}} + b_g

    The BN part is ``torch.nn.BatchNorm2d`` (biased batch statistics in training, running buffers with the
    unbiased variance in eval). The channel part normalises each sample over each group of ``C/G`` channels and all
    positions (biased variance) and applies ``group_weight`` ``a`` (init 1) and ``group_bias`` ``b`` (init 0), one
    per group.

    ``estimate=True`` is the paper's micro-batch mode (the official ``EstBN``): the BN part always normalises with
    the running estimates, which carry no gradient; in training they first move, without gradient, by
    ``moving_speed`` ``r``: ``μ̂ ← (1 − r)μ̂ + r·mean(x)``, ``σ̂² ← (1 − r)σ̂² + r·mean((x − μ̂_old)²)`` (deviation
    from the **old** mean estimate). The official code initialises its ``estbn_moving_speed`` buffer to 0 and leaves
    it to the caller, and the paper's value is not published; the default here, 0.1, is BatchNorm's momentum.

    Not foldable: the channel part depends on the sample (the BN part alone would fold into a preceding conv).

    Args:
        num_features: channel count ``C``.
        num_groups: ``G``, must divide ``C``. Default ``None``: the largest divisor of ``C`` at most 32 (the paper's
            32 where it divides).
        eps: both parts' eps. Default ``1e-5``.
        momentum: the BN part's EMA factor (``None``: cumulative average). Default ``0.1``.
        affine: learn the BN part's ``weight`` (init 1) and ``bias`` (init 0) and the channel part's
            ``group_weight`` (init 1) and ``group_bias`` (init 0). Default ``True``.
        estimate: the micro-batch mode with estimated statistics. Default ``False``.
        moving_speed: ``r`` of the estimated statistics, in ``[0, 1]``. Default ``0.1``.
        channel_dim: must be ``1``.
        process_group: ``torch.distributed`` group sharing the BN part's batch statistics (``None`` = WORLD).
        sync_stats: all-reduce the BN part's batch statistics in training (not used with ``estimate``). Default
            ``True``.

    Shape:
        input ``(N, C, *)`` (channels-last accepted); output the same shape and dtype.

    Example:
        >>> m = BatchChannelNorm(64, estimate=True)
        >>> m(torch.randn(1, 64, 8, 8)).shape  # one image: the micro-batch mode
        torch.Size([1, 64, 8, 8])
    """

    def __init__(
        self, num_features: int, *, num_groups: int | None = None, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, estimate: bool = False, moving_speed: float = 0.1, channel_dim: int = 1,
        process_group: object = None, sync_stats: bool = True, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, channel_dim, "channel_first")
        self.num_groups = resolve_num_groups(num_groups, num_features, "batch_channel_norm")
        self.eps, self.estimate = eps, estimate
        self.momentum = check_unit("batch_channel_norm", "momentum", momentum, optional=True)
        self.moving_speed = check_unit("batch_channel_norm", "moving_speed", moving_speed)
        self.process_group, self.sync_stats = process_group, sync_stats
        self._init_affine(num_features, weight=affine, bias=affine, device=device, dtype=dtype)
        for name in ("group_weight", "group_bias"):
            self.register_parameter(
                name, nn.Parameter(torch.empty(self.num_groups, device=device, dtype=dtype)) if affine else None
            )
        self._init_stats(bn_stats(num_features), device=device, dtype=dtype)
        self.reset_parameters()

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    group_weight: nn.Parameter | None
    group_bias: nn.Parameter | None
    syncs_batch_stats = True
    repr_always = ("num_groups",)
    rejects_mask = True

    def _param_init(self) -> dict[str, float]:
        return {"weight": 1.0, "bias": 0.0, "group_weight": 1.0, "group_bias": 0.0}

    def recalibration_plan(self) -> RecalibrationPlan | None:
        """The BN part's: ``momentum = 1`` writes the batch mean and unbiased variance. In the estimated mode the
        pass runs the ordinary BN part (``estimate`` off), so the estimates become the data's plain statistics
        instead of following their deviation-from-the-old-mean recursion."""
        plan = bn_recalibration_plan(self)
        if plan is not None and self.estimate:
            plan.overrides.append((self, "estimate", False))
        return plan

    def batch_stat_view(self) -> BatchStatView | None:
        return bn_batch_stat_view(self, 1)
