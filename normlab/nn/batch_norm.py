"""BatchNorm (Ioffe & Szegedy, ICML 2015, https://arxiv.org/abs/1502.03167): one module for channel-first
tensors ``(N, C, *)`` and for Transformer token tensors ``(B, N, C)`` with a padding mask.

Used in Transformers it is the baseline PowerNorm (https://arxiv.org/abs/2003.07845) and Unified
Normalization improve on; the same masking and layout conventions apply to those norms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normlab.functional.batch_norm import batch_norm
from normlab.nn._base import FoldedAffine, NormBase, batch_stat_affine, check_layout, check_num_features
from normlab.registry import Paper, register_norm

__all__ = ["BatchNorm"]


def _torch_batch_norm(num_features: int, kw: dict[str, Any]) -> nn.Module | None:
    if kw.get("channel_dim", 1) != 1:
        return None
    return nn.BatchNorm2d(
        num_features,
        eps=kw.get("eps", 1e-5),
        momentum=kw.get("momentum", 0.1),
        affine=kw.get("affine", True),
        track_running_stats=kw.get("track_running_stats", True),
    )


@register_norm(
    "batch_norm",
    functional=batch_norm,
    layout="any",
    has_running_stats=True,
    batch_dependent=True,
    foldable=True,
    aliases=("bn", "batchnorm1d", "batchnorm2d", "batchnorm3d"),
    paper=Paper(
        "Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift",
        "https://arxiv.org/abs/1502.03167",
    ),
    torch_equivalent=_torch_batch_norm,
    samples=({"channel_dim": -1}, {"affine": False}, {"momentum": None}, {"track_running_stats": False}),
    description="per-channel batch statistics; token tensors with padding masks; running stats at eval",
)
class BatchNorm(NormBase):
    r"""Batch normalization for channel-first and token tensors, with padding masks.

    Paper: Ioffe & Szegedy, https://arxiv.org/abs/1502.03167.

    .. math:: y = \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon}} \gamma_c + \beta_c

    In training mode ``μ`` and ``σ²`` (biased) are taken per channel over every other axis — over the valid
    positions only when ``mask`` is given — and the running buffers are updated with the unbiased variance
    (``torch.nn.BatchNorm*d`` semantics, ``momentum=None`` = cumulative average). In eval mode the running
    buffers are used, so the norm is a fixed per-channel affine (foldable).

    Args:
        num_features: channel count ``C``.
        eps: default ``1e-5``.
        momentum: EMA factor of the running stats, or ``None`` for a cumulative average. Default ``0.1``.
        affine: learn ``weight``/``bias``. Default ``True``.
        track_running_stats: keep running buffers (else batch statistics in eval mode too). Default ``True``.
        channel_dim: ``1`` (default, ``(N, C, *)``) or ``-1`` for token tensors ``(B, N, C)``.
        process_group: the ``torch.distributed`` group whose ranks share batch statistics in training;
            ``None`` = WORLD. Used only when ``torch.distributed`` is initialised.
        sync_stats: all-reduce the batch statistics over ``process_group`` in training (``SyncBatchNorm``
            semantics, padding-aware). ``False`` keeps per-rank statistics. Default ``True``.

    Shape:
        input ``(N, C, *)`` or ``(B, N, C)``; ``mask`` has the input's shape without the channel axis,
        ``True`` (or 1) marking valid positions. Output: the input's shape and dtype.

    Example:
        >>> bn = BatchNorm(8, channel_dim=-1)
        >>> x, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
        >>> bn(x, mask=mask).shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        channel_dim: int = 1,
        process_group: Any = None,
        sync_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features = check_num_features("batch_norm", num_features)
        self.channel_dim = check_layout("batch_norm", "any", channel_dim)
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"batch_norm: expected momentum in [0, 1] or None, got {momentum!r}")
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.process_group = process_group
        self.sync_stats = sync_stats
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_features, **factory)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.running_mean: Tensor | None = None
            self.running_var: Tensor | None = None
            self.num_batches_tracked: Tensor | None = None
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def functional_kwargs(self) -> dict[str, Any]:
        return {
            "num_features": self.num_features,
            "running_mean": self.running_mean,
            "running_var": self.running_var,
            "weight": self.weight,
            "bias": self.bias,
            "training": self.training,
            "momentum": self.momentum,
            "eps": self.eps,
            "channel_dim": self.channel_dim,
            "num_batches_tracked": self.num_batches_tracked,
            "process_group": self.process_group,
            "sync_stats": self.sync_stats,
        }

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return batch_norm(x, mask=mask, **self.functional_kwargs())

    def folded_affine(self) -> FoldedAffine:
        """``scale = γ / sqrt(running_var + eps)``, ``shift = β - scale * running_mean`` (float64)."""
        if self.training:
            raise RuntimeError("batch_norm: folded_affine() needs eval mode (running statistics); call .eval() first")
        if self.running_mean is None or self.running_var is None:
            raise TypeError("batch_norm: track_running_stats=False uses batch statistics in eval mode; not foldable")
        return FoldedAffine(*batch_stat_affine(self.running_mean, self.running_var, self.weight, self.bias, self.eps))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, channel_dim={self.channel_dim}, "
            f"sync_stats={self.sync_stats}"
        )
