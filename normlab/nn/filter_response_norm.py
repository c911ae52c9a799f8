"""Filter Response Normalization and the Thresholded Linear Unit (Singh & Krishnan, CVPR 2020,
https://arxiv.org/abs/1911.09737): a per-sample, per-channel normalization by the mean square over positions."""

from __future__ import annotations

import torch
from torch import nn

from normlab.functional.filter_response_norm import filter_response_norm
from normlab.nn._base import NormBase
from normlab.registry import Paper, register_norm

__all__ = ["FilterResponseNorm"]


@register_norm(
    "filter_response_norm", functional=filter_response_norm, layout="channel_first", aliases=("frn", "frn_tlu"),
    paper=Paper("Filter Response Normalization Layer: Eliminating Batch Dependence in the Training of Deep Neural "
                "Networks", "https://arxiv.org/abs/1911.09737"),
    samples=({"tlu": False}, {"eps": 1e-4, "affine": False}),
    description="x / sqrt(mean_hw(x^2) + eps), affine, then max(y, tau) (TLU); per sample, no state",
)
class FilterResponseNorm(NormBase):
    r"""Filter Response Normalization, followed by its Thresholded Linear Unit (FRN + TLU, replacing BN + ReLU).

    Paper: Singh & Krishnan, https://arxiv.org/abs/1911.09737 (Eq. 1-3).

    .. math:: \nu^2_{n,c} = \frac{1}{|*|}\sum x_{n,c}^2, \qquad
              y = \max\left(\gamma_c \frac{x}{\sqrt{\nu^2_{n,c} + \epsilon}} + \beta_c,\ \tau_c\right)

    No mean is subtracted (the learnt ``β`` and ``τ`` take its role); statistics are per sample and channel, so train
    and eval are identical and no state is kept. Not foldable (``ν²`` depends on the sample). For ``1×1`` feature
    maps the paper learns ``eps`` as well; here ``eps`` is a constant.

    Args:
        num_features: channel count ``C``.
        eps: default ``1e-6`` (the paper's).
        affine: learn ``weight`` (γ, init 1) and ``bias`` (β, init 0). Default ``True``.
        tlu: apply the TLU with a learnt per-channel threshold ``tau`` (init 0). Default ``True``.
        channel_dim: must be ``1``.

    Shape:
        input ``(N, C, *)``; ``(N, C)`` normalises each value by itself. Output: the input's shape and dtype.

    Example:
        >>> m = FilterResponseNorm(1)
        >>> m(torch.tensor([[[3.0, -4.0]]])).detach()  # nu^2 = 12.5; the TLU cuts the negative value at tau = 0
        tensor([[[0.8485, 0.0000]]])
    """

    def __init__(
        self, num_features: int, *, eps: float = 1e-6, affine: bool = True, tlu: bool = True, channel_dim: int = 1,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, channel_dim, "channel_first")
        self.eps, self.tlu = eps, tlu
        self._init_affine(num_features, weight=affine, bias=affine, device=device, dtype=dtype)
        self.tau = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype)) if tlu else None
        self.reset_parameters()

    tau: nn.Parameter | None
    rejects_mask = True

    def _param_init(self) -> dict[str, float]:
        return {"weight": 1.0, "bias": 0.0, "tau": 0.0}
