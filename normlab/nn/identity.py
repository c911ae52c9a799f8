"""The norm-free baseline: a registered identity that accepts every norm's constructor conventions."""

from __future__ import annotations

from typing import Any

import torch

from normlab.functional.identity import identity
from normlab.nn._base import FoldedAffine, NormBase
from normlab.registry import register_norm

__all__ = ["IdentityNorm", "identity"]


@register_norm(
    "identity", functional=identity, layout="any",
    foldable=True,
    aliases=("none", "no_norm"),
    samples=({"channel_dim": 1},),
    description="no normalization (the norm-free baseline)",
)
class IdentityNorm(NormBase):
    """No normalization: returns its input. The baseline every norm is compared with.

    It validates the channel count like any norm so a misconfigured model fails loudly, and ignores the
    keyword arguments other norms take (``eps``, ``affine``, ...) so it can stand in any slot.

    Example:
        >>> IdentityNorm(8)(torch.ones(2, 8)).sum().item()
        16.0
    """

    def __init__(
        self,
        num_features: int,
        *,
        channel_dim: int = -1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **ignored: Any,
    ) -> None:
        super().__init__(num_features, channel_dim)

    def folded_affine(self) -> FoldedAffine:
        return FoldedAffine(
            torch.ones(self.num_features, dtype=torch.float64), torch.zeros(self.num_features, dtype=torch.float64)
        )
