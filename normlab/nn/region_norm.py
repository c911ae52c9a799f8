"""Region Normalization, RN-B and RN-L (Yu et al., "Region Normalization for Image Inpainting", AAAI 2020,
https://arxiv.org/abs/1911.10375)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.functional.region_norm import STATISTICS, region_norm
from normlab.nn._base import NormBase
from normlab.registry import Paper, register_norm

__all__ = ["RegionNorm"]

_RN_B = ("foreground_gamma", "foreground_beta", "background_gamma", "background_beta")
_RN_L = ("sa_weight", "gamma_weight", "gamma_bias", "beta_weight", "beta_bias")


@register_norm(
    "region_norm", functional=region_norm, layout="channel_first",
    batch_dependent=True, foldable=False,
    aliases=("rn", "rn_b", "rn_l"),
    paper=Paper("Region Normalization for Image Inpainting", "https://arxiv.org/abs/1911.10375"),
    samples=({"learnable": True}, {"statistics": "instance"}, {"learnable": True, "threshold": 0.5}),
    description="separate statistics for the hole and the valid region of an inpainting mask (RN-B) or of a "
                "learnt region map (RN-L)",
)
class RegionNorm(NormBase):
    r"""Region Normalization: the pixels of two regions normalised with separate statistics.

    Paper: Yu et al., "Region Normalization for Image Inpainting", https://arxiv.org/abs/1911.10375 (Section 3);
    defaults are the official code's (``geekyutao/RN``, ``rn.py``).

    .. math:: \hat x = \sum_{k \in \{0, 1\}} M_k \frac{x - \mu_k}{\sqrt{\sigma^2_k + \epsilon_k}}

    **RN-B** (``learnable=False``, the encoder's): ``M_1`` is the inpainting ``mask`` given to :meth:`forward`
    (**1 = hole**, the official convention), resized to the feature map by nearest neighbour, ``M_0 = 1 − M_1``;
    output ``x̂·M_1·(1 + γ_fg) + β_fg + x̂·M_0·(1 + γ_bg) + β_bg`` with ``foreground_*`` / ``background_*`` per
    channel, init 0; both ``β`` are added to every pixel, as in the official code. ``mask=None`` means no hole (one
    region).

    **RN-L** (``learnable=True``, the residual blocks' and decoder's): an importance map
    ``S = sigmoid(conv7×7([mean_C x, max_C x]))`` (``sa_weight``) gives the regions ``M_1 = 1[S ≥ threshold]``
    (without gradient) and a spatial affine ``x̂·(1 + conv7×7(S)) + conv7×7(S)`` (``gamma_weight``/``gamma_bias``,
    ``beta_weight``/``beta_bias``). Its convolutions start at zero (the official code leaves them to the model's
    initialiser), so RN-L starts as one-region normalization with the identity affine.

    ``statistics="batch"`` (default, the released code, "BN-style" on purpose per its authors): ``μ_k``, ``σ²_k``
    per channel over the region's pixels of the whole batch, with ``ε_k = ε·NHW/|region|`` - exactly what its
    fill-with-the-mean BatchNorm rescaled by ``sqrt(|region|/NHW)`` gives; batch statistics in train **and** eval.
    ``statistics="instance"``: the paper's per-sample formula, per ``(n, c)`` over ``H×W``, ``ε_k = ε``. An empty
    region contributes nothing. No running statistics; not foldable.

    Args:
        num_features: channel count ``C``.
        learnable: RN-L instead of RN-B. Default ``False``.
        threshold: RN-L's ``t``. Default ``0.8`` (``--threshold``).
        statistics: ``"batch"`` (default) or ``"instance"``.
        eps: default ``1e-5``.
        kernel_size: RN-L's convolution size. Default ``7``.
        channel_dim: must be ``1``.

    Shape:
        input ``(N, C, H, W)`` (channels-last accepted); ``mask`` (RN-B) ``(N, H', W')`` or ``(N, 1 or C, H', W')``,
        binary (bool, integer or float); output the input's shape and dtype.

    Example:
        >>> m = RegionNorm(1)
        >>> x, hole = torch.tensor([[[[1.0, 3.0, 10.0, 14.0]]]]), torch.tensor([[[[1, 1, 0, 0]]]])
        >>> m(x, mask=hole).detach().flatten()  # the spec's vector: each region normalised on its own
        tensor([-1.0000,  1.0000, -1.0000,  1.0000])
    """

    def __init__(
        self, num_features: int, *, learnable: bool = False, threshold: float = 0.8, statistics: str = "batch",
        eps: float = 1e-5, kernel_size: int = 7, channel_dim: int = 1, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, channel_dim, "channel_first")
        if statistics not in STATISTICS:
            raise ValueError(f"region_norm: expected statistics in {STATISTICS}, got {statistics!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"region_norm: expected kernel_size to be an odd int >= 1, got {kernel_size!r}")
        self.learnable = learnable
        self.threshold = threshold
        self.statistics = statistics
        self.eps = eps
        self.kernel_size = kernel_size
        k = kernel_size
        shapes = {"foreground_gamma": (num_features,), "foreground_beta": (num_features,),
                  "background_gamma": (num_features,), "background_beta": (num_features,),
                  "sa_weight": (1, 2, k, k), "gamma_weight": (1, 1, k, k), "gamma_bias": (1,),
                  "beta_weight": (1, 1, k, k), "beta_bias": (1,)}
        used = _RN_L if learnable else _RN_B
        for name, shape in shapes.items():
            param = nn.Parameter(torch.empty(shape, device=device, dtype=dtype)) if name in used else None
            self.register_parameter(name, param)
        self.reset_parameters()

    def _param_init(self) -> dict[str, float]:
        return {name: 0.0 for name in (*_RN_B, *_RN_L)}

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x`` normalised by region; ``mask`` is RN-B's inpainting mask (1 = hole), RN-L takes none."""
        return super().forward(x, mask)
