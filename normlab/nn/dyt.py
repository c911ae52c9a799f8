"""Dynamic Tanh (DyT), "Transformers without Normalization" (Zhu, Chen, He, LeCun, Liu, CVPR 2025,
https://arxiv.org/abs/2503.10622): an element-wise replacement for LayerNorm/RMSNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.functional.dyt import dyt
from normlab.kernels._scope import Impl
from normlab.nn._base import NormBase
from normlab.registry import Paper, register_norm

__all__ = ["DyT"]


@register_norm(
    "dyt", functional=dyt, layout="any", aliases=("dynamic_tanh",),
    paper=Paper("Transformers without Normalization", "https://arxiv.org/abs/2503.10622"),
    samples=({"bias": False}, {"affine": False}, {"alpha_init": 0.8}, {"channel_dim": 1}),
    description="gamma * tanh(alpha * x) + beta with one scalar alpha (init 0.5); no statistics",
)
class DyT(NormBase):
    r"""Dynamic Tanh: ``y = γ ⊙ tanh(α x) + β``.

    Paper: Zhu, Chen, He, LeCun, Liu, "Transformers without Normalization", https://arxiv.org/abs/2503.10622.

    ``α`` is **one learnable scalar per layer** (not per channel); γ (init 1) and β (init 0) are per channel.
    No statistics: train and eval are identical. The official α0 is 0.5 for non-LLM models; the LLaMA recipe
    uses a larger α0 for the attention-input DyT than for the FFN-input and final DyT
    (7B: 0.8 / 0.2 / 0.2; the paper's α0 study and the official LLaMA training commands).

    Args:
        num_features: channel count ``C``.
        alpha_init: initial ``α``. Default ``0.5``.
        affine: learn γ. Default ``True`` (``False``: the DiT variant for affine-free LayerNorms).
        bias: learn β when ``affine``. Default ``True`` (``False``: the LLaMA variant).
        channel_dim: ``-1`` (default) or ``1`` for ``(N, C, H, W)``.
        impl: ``"auto"`` (default), ``"composite"``, ``"cpu"`` or ``"triton"``: which implementation runs the
            forward (:func:`normlab.kernels.use_impl` sets it for a scope; this argument, unless ``"auto"``, wins).

    Shape:
        input ``(*, C)``; output the same shape and dtype (float16/bfloat16 computed in float32).

    Example:
        >>> DyT(4)(torch.tensor([-2.0, -0.5, 0.0, 1.0])).detach()
        tensor([-0.7616, -0.2449,  0.0000,  0.4621])
    """

    def __init__(
        self, num_features: int, *, alpha_init: float = 0.5, affine: bool = True, bias: bool = True,
        channel_dim: int = -1, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        impl: Impl = "auto",
    ) -> None:
        super().__init__(num_features, channel_dim, impl=impl)
        self.alpha_init = float(alpha_init)
        self.alpha = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self._init_affine(num_features, weight=affine, bias=affine and bias, device=device, dtype=dtype)
        self.reset_parameters()

    kernel_op = "dyt"
    saturates_inf = True  # tanh(±inf) = ±1: an infinite input gives a finite output

    def _param_init(self) -> dict[str, float]:
        return {"alpha": self.alpha_init, "weight": 1.0, "bias": 0.0}

    def saturation(self, x: Tensor) -> Tensor:
        """Where this norm's tanh saturates on input ``x``: a bool mask of the elements with ``|αx| > 2`` (there
        ``tanh`` is within 3.6% of ±1 and its slope ``1 - tanh²`` below 0.071). Read by
        :mod:`normlab.diagnostics.saturation`, which measures any norm that has this method."""
        return (self.alpha.detach().to(x.dtype) * x).abs() > 2.0
