"""Functional LayerNorm (Ba, Kiros, Hinton 2016, https://arxiv.org/abs/1607.06450).

See :class:`normlab.nn.LayerNorm` for the definition, shapes and dtype contract.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from normlab.functional._checks import affine_in, check_channels, from_compute, to_compute

__all__ = ["layer_norm"]


def layer_norm(
    x: Tensor, normalized_shape: int | tuple[int, ...], weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5, channel_dim: int = -1,
) -> Tensor:
    """LayerNorm over ``normalized_shape`` (trailing dims) or over the channel axis ``channel_dim``."""
    cd = check_channels(x, normalized_shape, channel_dim, "layer_norm")
    if isinstance(normalized_shape, tuple):  # trailing dims: nothing to move
        shape, cd = normalized_shape, x.dim() - 1
    else:
        shape = (normalized_shape,)
    xs = to_compute(x, cd)
    return from_compute(F.layer_norm(xs, shape, *affine_in(xs.dtype, weight, bias), eps), x, cd)
