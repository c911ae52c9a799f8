"""BatchNorm (Ioffe & Szegedy, ICML 2015, https://arxiv.org/abs/1502.03167): one module for channel-first
tensors ``(N, C, *)`` and for Transformer token tensors ``(B, N, C)`` with a padding mask.

Used in Transformers it is the baseline PowerNorm (https://arxiv.org/abs/2003.07845) and Unified
Normalization improve on; the same masking and layout conventions apply to those norms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.functional.batch_norm import batch_norm
from normlab.kernels._scope import Impl
from normlab.nn._base import BatchNormProtocol, NormBase, check_unit
from normlab.registry import Paper, register_norm

__all__ = ["BatchNorm", "bn_torch_twin", "init_bn_state"]


def bn_torch_twin(torch_cls: type[nn.Module], num_features: int, args: dict[str, Any]) -> nn.Module | None:
    """``torch_cls`` (``nn.BatchNorm2d``, ``nn.InstanceNorm2d``) built from a norm's resolved constructor arguments
    ``args`` (:meth:`NormBase.resolved_kwargs`), or ``None`` unless the channel axis is torch's (``channel_dim=1``)."""
    if args["channel_dim"] != 1:
        return None
    keys = ("eps", "momentum", "affine", "track_running_stats")
    return torch_cls(num_features, **{k: args[k] for k in keys})


def bn_stats(num_features: int) -> list[tuple[str, tuple[int, ...], float]]:
    """BatchNorm's running buffers with their reset values (torch's names, so state dicts load both ways)."""
    return [("running_mean", (num_features,), 0.0), ("running_var", (num_features,), 1.0),
            ("num_batches_tracked", (), 0)]


def init_bn_state(m: NormBase, affine: bool, track_running_stats: bool, device: Any, dtype: Any) -> None:
    """BatchNorm's state under torch's names, so state dicts load both ways: per-channel ``weight`` / ``bias`` when
    ``affine`` and ``running_mean`` / ``running_var`` / ``num_batches_tracked`` (``None`` without tracking)."""
    setattr(m, "track_running_stats", track_running_stats)  # noqa: B010 - a plain attribute NormBase does not declare
    m._init_affine(m.num_features, weight=affine, bias=affine, device=device, dtype=dtype)
    m._init_stats(bn_stats(m.num_features), track=track_running_stats, device=device, dtype=dtype)


@register_norm(
    "batch_norm", functional=batch_norm, layout="any",
    has_running_stats=True, batch_dependent=True, foldable=True,
    aliases=("bn", "batchnorm1d", "batchnorm2d", "batchnorm3d"),
    paper=Paper(
        "Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift",
        "https://arxiv.org/abs/1502.03167",
    ),
    samples=({"channel_dim": -1}, {"affine": False}, {"momentum": None}, {"track_running_stats": False}),
    description="per-channel batch statistics; token tensors with padding masks; running stats at eval",
)
class BatchNorm(BatchNormProtocol, NormBase):
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
        impl: ``"auto"`` (default), ``"composite"`` or ``"cpu"``: the training forward/backward of token tensors
            runs a fused kernel unless ``"composite"`` (:func:`normlab.kernels.use_impl` sets it for a scope).

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
        self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
        track_running_stats: bool = True, channel_dim: int = 1, process_group: Any = None, sync_stats: bool = True,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None, impl: Impl = "auto",
    ) -> None:
        super().__init__(num_features, channel_dim, impl=impl)
        self.eps = eps
        self.momentum = check_unit("batch_norm", "momentum", momentum, optional=True)
        self.process_group, self.sync_stats = process_group, sync_stats
        init_bn_state(self, affine, track_running_stats, device, dtype)
        self.reset_parameters()

    kernel_op = "batch_norm"

    @classmethod
    def torch_twin(cls, num_features: int, **kwargs: Any) -> nn.Module | None:
        return bn_torch_twin(nn.BatchNorm2d, num_features, cls.resolved_kwargs(**kwargs))

    @classmethod
    def from_torch(cls, bn: _BatchNorm, process_group: Any = None) -> BatchNorm:
        """A :class:`BatchNorm` (``channel_dim=1``, ``sync_stats=True``) with a ``torch.nn`` BatchNorm's exact
        parameters and buffers, device, dtypes, training flag and ``requires_grad`` flags."""
        like = bn.weight if bn.weight is not None else bn.running_mean
        out = cls(
            bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
            track_running_stats=bn.track_running_stats, channel_dim=1, process_group=process_group, sync_stats=True,
            device=like.device if like is not None else None, dtype=like.dtype if like is not None else None,
        )
        with torch.no_grad():
            for name in ("weight", "bias"):
                src, dst = getattr(bn, name), getattr(out, name)
                if src is not None and dst is not None:
                    dst.copy_(src)
                    dst.requires_grad_(src.requires_grad)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(bn, name), getattr(out, name)
                if src is not None and dst is not None:
                    dst.copy_(src)
        out.train(bn.training)
        return out
