"""GroupNorm (Wu & He, ECCV 2018, https://arxiv.org/abs/1803.08494) and InstanceNorm (Ulyanov, Vedaldi,
Lempitsky 2016, https://arxiv.org/abs/1607.08022), channel-first by default, token tensors with ``channel_dim=-1``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normlab.functional._checks import check_num_groups
from normlab.functional.group_norm import group_norm, instance_norm
from normlab.kernels._scope import Impl
from normlab.nn._base import NormBase
from normlab.nn.batch_norm import bn_torch_twin, init_bn_state
from normlab.registry import Paper, register_norm

__all__ = ["GroupNorm", "InstanceNorm", "default_num_groups", "resolve_num_groups"]


def default_num_groups(num_channels: int, preferred: int = 32) -> int:
    """The largest divisor of ``num_channels`` that is at most ``preferred`` (32 as in the paper)."""
    for g in range(min(preferred, num_channels), 0, -1):
        if num_channels % g == 0:
            return g
    return 1


def resolve_num_groups(num_groups: int | None, num_features: int, op: str, features: str = "num_features") -> int:
    """``num_groups``, or :func:`default_num_groups` when it is ``None``; ``ValueError`` unless it divides
    ``num_features`` (``features``: the caller's name for the channel count)."""
    return check_num_groups(default_num_groups(num_features) if num_groups is None else num_groups, num_features, op,
                            features)


@register_norm(
    "group_norm",
    functional=group_norm,
    layout="any",
    aliases=("gn",),
    paper=Paper("Group Normalization", "https://arxiv.org/abs/1803.08494"),
    samples=({"num_groups": 1}, {"affine": False}, {"channel_dim": -1}),
    description="per-sample statistics over groups of channels and all positions",
)
class GroupNorm(NormBase):
    r"""Group normalization: per sample, mean/variance over each group of channels and all spatial positions.

    Paper: Wu & He, "Group Normalization", https://arxiv.org/abs/1803.08494.

    .. math:: y = \frac{x - \mathrm{E}_{g}[x]}{\sqrt{\mathrm{Var}_{g}[x] + \epsilon}} \odot \gamma + \beta

    Unlike ``torch.nn.GroupNorm(num_groups, num_channels)``, the channel count comes first (house convention);
    ``num_groups`` defaults to the largest divisor of ``C`` that is at most 32. State-dict keys are torch's.

    Args:
        num_channels: channel count ``C``.
        num_groups: number of groups; must divide ``C``. ``1`` gives LayerNorm over (C, *), ``C`` InstanceNorm.
        eps: default ``1e-5``.
        affine: per-channel ``weight``/``bias``. Default ``True``.
        channel_dim: ``1`` (default, ``(N, C, *)``) or ``-1`` for token tensors ``(B, N, C)``.
        impl: ``"auto"`` (default), ``"composite"`` or ``"cpu"``: which implementation runs the forward (token
            tensors have a fused CPU kernel; :func:`normlab.kernels.use_impl` sets it for a scope).

    Shape:
        input ``(N, C, *)``; output the same shape and dtype.

    Example:
        >>> GroupNorm(64, num_groups=8)(torch.randn(2, 64, 4, 4)).shape
        torch.Size([2, 64, 4, 4])
    """

    def __init__(
        self,
        num_channels: int,
        *,
        num_groups: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        channel_dim: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        impl: Impl = "auto",
    ) -> None:
        super().__init__(num_channels, channel_dim, impl=impl)
        self.num_channels = self.num_features
        self.num_groups = resolve_num_groups(num_groups, num_channels, "group_norm", "num_channels")
        self.eps = eps
        self.affine = affine
        self._init_affine(num_channels, weight=affine, bias=affine, device=device, dtype=dtype)
        self.reset_parameters()

    repr_always = ("num_groups",)  # resolved from the default None
    kernel_op = "group_norm"

    @classmethod
    def torch_twin(cls, num_features: int, **kwargs: Any) -> nn.Module | None:
        k = cls.resolved_kwargs(**kwargs)
        if k["channel_dim"] != 1:
            return None
        g = k["num_groups"] or default_num_groups(num_features)
        return nn.GroupNorm(g, num_features, eps=k["eps"], affine=k["affine"])

    rejects_mask = True


@register_norm(
    "instance_norm",
    functional=instance_norm,
    layout="any",
    aliases=("in", "instancenorm1d", "instancenorm2d", "instancenorm3d"),
    paper=Paper("Instance Normalization: The Missing Ingredient for Fast Stylization", "https://arxiv.org/abs/1607.08022"),
    samples=({"affine": True}, {"affine": True, "track_running_stats": True}, {"channel_dim": -1, "affine": True}),
    description="per-sample, per-channel statistics over all positions",
)
class InstanceNorm(NormBase):
    r"""Instance normalization: per sample and channel, mean/variance over all spatial positions.

    Paper: Ulyanov, Vedaldi, Lempitsky, https://arxiv.org/abs/1607.08022. One module for 1d/2d/3d inputs;
    defaults follow ``torch.nn.InstanceNorm*d`` (``affine=False``, ``track_running_stats=False``), and so do the
    state-dict keys.

    Args:
        num_features: channel count ``C``.
        eps: default ``1e-5``.
        momentum: running-stat EMA factor. Default ``0.1``.
        affine: per-channel ``weight``/``bias``. Default ``False``.
        track_running_stats: keep running mean/var and use them in eval mode. Default ``False``.
        channel_dim: ``1`` (default) or ``-1`` for token tensors ``(B, N, C)``.
        impl: ``"auto"`` (default), ``"composite"`` or ``"cpu"``: which implementation runs the forward (the input
            statistics of token tensors have a fused CPU kernel, which updates the running buffers too).

    Shape:
        input ``(N, C, L, *)`` with at least one spatial axis; output the same shape and dtype.

    Example:
        >>> InstanceNorm(3)(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(
        self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
        track_running_stats: bool = False, channel_dim: int = 1, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        impl: Impl = "auto",
    ) -> None:
        super().__init__(num_features, channel_dim, impl=impl)
        self.eps = eps
        self.momentum = momentum
        init_bn_state(self, affine, track_running_stats, device, dtype)
        self.reset_parameters()

    kernel_op = "instance_norm"

    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    @classmethod
    def torch_twin(cls, num_features: int, **kwargs: Any) -> nn.Module | None:
        return bn_torch_twin(nn.InstanceNorm2d, num_features, cls.resolved_kwargs(**kwargs))

    def _functional_arg(self, name: str) -> Any:
        if name == "use_input_stats":
            return self.training or not self.track_running_stats
        return super()._functional_arg(name)

    # The forward leaves num_batches_tracked at 0, as torch.nn.InstanceNorm*d does (its momentum is never cumulative).
    rejects_mask = True

