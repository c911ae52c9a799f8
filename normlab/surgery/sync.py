"""Cross-rank synchronisation of batch-statistic norms: :func:`convert_sync_norms` turns every ``torch.nn``
BatchNorm (1d/2d/3d and ``SyncBatchNorm``) into normlab's :class:`~normlab.nn.BatchNorm` with synced, padding-aware
statistics (BatchNorm: Ioffe & Szegedy, https://arxiv.org/abs/1502.03167), and points every normlab norm that
takes ``process_group=`` at the given group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.nn.batch_norm import BatchNorm

__all__ = ["convert_sync_norms", "sync_batch_norm_from_torch"]


def sync_batch_norm_from_torch(bn: _BatchNorm, process_group: Any = None) -> BatchNorm:
    """A normlab :class:`BatchNorm` (``channel_dim=1``, ``sync_stats=True``) with ``bn``'s exact params and buffers.

    The new module has ``bn``'s device, dtypes, training flag and ``requires_grad`` flags.
    """
    ref = bn.weight if bn.weight is not None else bn.running_mean
    device = ref.device if ref is not None else None
    dtype = ref.dtype if ref is not None else None
    out = BatchNorm(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        channel_dim=1,
        process_group=process_group,
        sync_stats=True,
        device=device,
        dtype=dtype,
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


def convert_sync_norms(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every batch-statistic norm in ``model`` share statistics across the ranks of ``process_group``.

    * ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` are replaced by normlab's :class:`BatchNorm`
      (``channel_dim=1``), copying parameters and buffers exactly; unlike ``SyncBatchNorm`` it accepts padding masks
      and token tensors.
    * normlab norms with a ``process_group`` attribute (BatchNorm, RepBN/PRepBN, PowerNorm, UnifiedNorm) get
      ``process_group`` and ``sync_stats=True``.

    ``process_group=None`` means the WORLD group at forward time. Returns the converted model (a new module when
    ``model`` itself is a torch BatchNorm), like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> type(convert_sync_norms(net)[1]).__name__
        'BatchNorm'
    """
    if isinstance(model, _BatchNorm):
        return sync_batch_norm_from_torch(model, process_group)
    for module in model.modules():
        if hasattr(module, "process_group") and hasattr(module, "sync_stats"):
            setattr(module, "process_group", process_group)  # noqa: B010 - not every nn.Module declares these
            setattr(module, "sync_stats", True)  # noqa: B010
    _replace_torch_bn(model, process_group)
    return model


def _replace_torch_bn(parent: nn.Module, process_group: Any) -> None:
    for name, child in list(parent.named_children()):
        if isinstance(child, _BatchNorm):
            parent.add_module(name, sync_batch_norm_from_torch(child, process_group))
        else:
            _replace_torch_bn(child, process_group)
