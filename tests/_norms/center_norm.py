"""CenterNorm: per-token mean subtraction, ``y = γ ⊙ (x - mean_C(x)) + β``; the mean-centering half of LayerNorm
that RMSNorm drops (Zhang & Sennrich, "Root Mean Square Layer Normalization", https://arxiv.org/abs/1910.07467).

A new norm in one file, as normlab's own are spread over functional/, nn/ and testing/: the op, the module with its
registration, the reference. Nothing else names it, and the contract suite runs on it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normlab.functional._checks import check_channels, compute_dtype
from normlab.nn._base import NormBase, check_layout, check_num_features
from normlab.registry import register_norm, register_reference


def center_norm(
    x: Tensor, num_features: int, weight: Tensor | None = None, bias: Tensor | None = None, channel_dim: int = -1
) -> Tensor:
    """``weight * (x - mean(x)) + bias`` over the channel axis. See :class:`CenterNorm`."""
    cd = check_channels(x, num_features, channel_dim, "center_norm")
    ct = compute_dtype(x)
    xc = x.to(ct)
    y = xc - xc.mean(cd, keepdim=True)
    shape = [1] * x.dim()
    shape[cd] = num_features
    if weight is not None:
        y = y * weight.to(ct).reshape(shape)
    if bias is not None:
        y = y + bias.to(ct).reshape(shape)
    return y.to(x.dtype)


@register_norm(
    "center_norm",
    functional=center_norm,
    layout="any",
    samples=({"bias": False}, {"affine": False}, {"channel_dim": 1}),
)
class CenterNorm(NormBase):
    """Per-token mean subtraction with a per-channel affine: ``y = γ ⊙ (x - mean_C(x)) + β``.

    Args:
        num_features: channel count ``C``.
        affine: learn γ (init 1). Default ``True``.
        bias: learn β (init 0) when ``affine``. Default ``True``.
        channel_dim: ``-1`` (default) or ``1`` for ``(N, C, H, W)``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        affine: bool = True,
        bias: bool = True,
        channel_dim: int = -1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features = check_num_features("center_norm", num_features)
        self.channel_dim = check_layout("center_norm", "any", channel_dim)
        self.affine = affine
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_features, **factory)) if affine and bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def functional_kwargs(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "weight": self.weight, "bias": self.bias,
                "channel_dim": self.channel_dim}

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return center_norm(x, **self.functional_kwargs())


@register_reference("center_norm")
def center_norm_reference(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Float64, from the definition: subtract the mean over the channel axis, then the affine."""
    xl = x.to(torch.float64).movedim(m.channel_dim, -1)
    y = xl - xl.sum(-1, keepdim=True) / xl.shape[-1]
    if m.weight is not None:
        y = y * m.weight.detach().double()
    if m.bias is not None:
        y = y + m.bias.detach().double()
    return y.movedim(-1, m.channel_dim)
