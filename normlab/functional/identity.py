"""Functional identity: the norm-free baseline's op (the input, after the checks every norm makes).

See :class:`normlab.nn.IdentityNorm`.
"""

from __future__ import annotations

from torch import Tensor

from normlab.functional._checks import check_channels

__all__ = ["identity"]


def identity(x: Tensor, num_features: int, channel_dim: int = -1) -> Tensor:
    """Return ``x`` after the same input checks every norm makes."""
    check_channels(x, num_features, channel_dim, "identity")
    return x
