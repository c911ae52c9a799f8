"""Base class of normlab's norm modules: the shared constructor conventions and the forward signature.

Conventions (``../shared/STYLE.md``): the first positional argument is the feature/channel count; every
norm takes ``channel_dim`` (where the channel axis is); ``forward(x, mask=None)`` where ``mask`` is a
padding mask (``True`` = valid) that batch-statistic norms use and per-token norms may ignore, because a
per-token statistic never mixes tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from normlab.registry import Layout

__all__ = ["FoldedAffine", "NormBase", "batch_stat_affine", "check_layout", "check_num_features"]


@dataclass
class FoldedAffine:
    """The eval-mode form of a foldable norm: ``y = scale * keep(x) + shift`` per channel.

    ``keep`` is a per-token module that must stay in the graph (PowerNorm's GroupScaling), or ``None``.
    ``scale`` and ``shift`` are 1-D float tensors of length ``num_features``, computed in float64 so a
    fold loses nothing before it casts back.
    """

    scale: Tensor
    shift: Tensor
    keep: nn.Module | None = None


def batch_stat_affine(
    running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Float64 ``(scale, shift)`` of BatchNorm's eval form: ``scale = γ/sqrt(rv + eps)``, ``shift = β - scale·rm``."""
    scale = (running_var.detach().double() + eps).rsqrt()
    if weight is not None:
        scale = scale * weight.detach().double()
    shift = -scale * running_mean.detach().double()
    if bias is not None:
        shift = shift + bias.detach().double()
    return scale, shift


def check_layout(op: str, layout: Layout, channel_dim: int) -> int:
    """Validate ``channel_dim`` against a norm's layout trait."""
    if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
        raise TypeError(f"{op}: expected channel_dim to be an int, got {type(channel_dim).__name__}")
    if layout == "token" and channel_dim != -1:
        raise ValueError(
            f"{op}: this norm works on token tensors (*, C) only; expected channel_dim=-1, got {channel_dim}"
        )
    if layout == "channel_first" and channel_dim != 1:
        raise ValueError(f"{op}: this norm works on (N, C, *) tensors only; expected channel_dim=1, got {channel_dim}")
    return channel_dim


def check_num_features(op: str, num_features: Any, *, minimum: int = 1) -> int:
    """Validate a positive integer feature count."""
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < minimum:
        raise ValueError(f"{op}: expected num_features to be an int >= {minimum}, got {num_features!r}")
    return num_features


class NormBase(nn.Module):
    """Common base of normlab norms.

    Subclasses implement :meth:`functional_kwargs` (the keyword arguments that make the functional op
    compute exactly this module's forward) and :meth:`forward`.
    """

    num_features: int
    channel_dim: int

    def functional_kwargs(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def folded_affine(self) -> FoldedAffine:
        """Eval-mode per-channel affine of a foldable norm (``NormSpec.foldable``); others raise ``TypeError``."""
        raise TypeError(
            f"{type(self).__name__} is not foldable: its eval-mode output is not a fixed per-channel affine"
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
