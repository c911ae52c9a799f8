"""LayerNorm (Ba, Kiros, Hinton 2016, https://arxiv.org/abs/1607.06450) with optional bias and a
``channel_dim`` argument for channel-first tensors (ConvNeXt's LayerNorm2d is ``LayerNorm(C, channel_dim=1)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normlab.functional.layer_norm import layer_norm
from normlab.kernels._scope import Impl
from normlab.nn._base import NormBase
from normlab.registry import Paper, register_norm

__all__ = ["LayerNorm"]


@register_norm(
    "layer_norm", functional=layer_norm, layout="any", aliases=("ln", "layernorm2d"),
    paper=Paper("Layer Normalization", "https://arxiv.org/abs/1607.06450"),
    samples=({"bias": False}, {"affine": False}, {"channel_dim": 1}),
    description="per-token mean/variance; optional bias; channel_dim for NCHW",
)
class LayerNorm(NormBase):
    r"""Layer normalization over the channel axis of each token (or each spatial position).

    Paper: Ba, Kiros, Hinton, "Layer Normalization", https://arxiv.org/abs/1607.06450.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \odot \gamma + \beta

    The mean and (biased) variance are taken over the ``normalized_shape`` trailing dims, or over the single
    axis ``channel_dim`` when it is not ``-1``.

    Args:
        normalized_shape: channel count ``C`` (or a tuple of trailing dims, as ``torch.nn.LayerNorm``).
        eps: added to the variance inside the square root. Default: ``1e-5``.
        affine: learn ``weight`` (γ, init 1). Default: ``True``. ``elementwise_affine`` is accepted as torch's name.
        bias: learn ``bias`` (β, init 0) when ``affine``. Default: ``True``.
        channel_dim: the axis normalized when ``normalized_shape`` is an int. Default ``-1``; ``1`` for NCHW.
        impl: ``"auto"`` (default), ``"composite"``, ``"cpu"`` or ``"triton"``: which implementation runs the
            forward (:func:`normlab.kernels.use_impl` sets it for a scope; this argument, unless ``"auto"``, wins).

    Shape:
        input ``(*, C)`` (or ``(N, C, *)`` with ``channel_dim=1``); output the same shape.
        Statistics of float16/bfloat16 inputs are computed in float32; the output has the input's dtype.

    Example:
        >>> m = LayerNorm(8)
        >>> m(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self, normalized_shape: int | tuple[int, ...] | list[int], *, eps: float = 1e-5, affine: bool = True,
        bias: bool = True, channel_dim: int = -1, elementwise_affine: bool | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None, impl: Impl = "auto",
    ) -> None:
        if elementwise_affine is not None:
            affine = elementwise_affine
        if isinstance(normalized_shape, (list, tuple)):
            shape = tuple(int(s) for s in normalized_shape)
            if len(shape) == 1:
                shape_or_int: int | tuple[int, ...] = shape[0]
            else:
                shape_or_int = shape
                if channel_dim != -1:
                    raise ValueError(
                        f"layer_norm: a multi-dim normalized_shape={list(shape)} needs channel_dim=-1, "
                        f"got {channel_dim}"
                    )
        else:
            shape_or_int = normalized_shape
        dims = shape_or_int if isinstance(shape_or_int, tuple) else (shape_or_int,)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise ValueError(f"layer_norm: expected normalized_shape of positive ints, got {normalized_shape!r}")
        super().__init__(int(torch.Size(dims).numel()), channel_dim, impl=impl)
        self.normalized_shape = shape_or_int
        self.eps = eps
        self._init_affine(dims, weight=affine, bias=affine and bias, device=device, dtype=dtype)
        self.reset_parameters()

    kernel_op = "layer_norm"

    @classmethod
    def torch_twin(cls, num_features: int, **kwargs: Any) -> nn.Module | None:
        k = cls.resolved_kwargs(**kwargs)
        if k["channel_dim"] != -1:
            return None
        affine = k["affine"] if k["elementwise_affine"] is None else k["elementwise_affine"]
        return nn.LayerNorm(num_features, eps=k["eps"], elementwise_affine=affine, bias=k["bias"])

