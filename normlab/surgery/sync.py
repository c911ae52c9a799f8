"""Cross-rank synchronisation of batch-statistic norms: :func:`convert_sync_norms` turns every ``torch.nn``
BatchNorm (1d/2d/3d and ``SyncBatchNorm``) into normlab's :class:`~normlab.nn.BatchNorm` with synced, padding-aware
statistics (BatchNorm: Ioffe & Szegedy, https://arxiv.org/abs/1502.03167), and points every normlab norm that
takes ``process_group=`` at the given group.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.nn.batch_norm import BatchNorm
from normlab.walk import iter_norms, norm_protocol

__all__ = ["convert_sync_norms", "sync_batch_norm_from_torch"]


def sync_batch_norm_from_torch(bn: _BatchNorm, process_group: Any = None) -> BatchNorm:
    """A normlab :class:`BatchNorm` (``channel_dim=1``, ``sync_stats=True``) with ``bn``'s exact params and buffers
    (:meth:`BatchNorm.from_torch`)."""
    return BatchNorm.from_torch(bn, process_group)


def convert_sync_norms(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every batch-statistic norm in ``model`` share statistics across the ranks of ``process_group``.

    * ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` are replaced by normlab's :class:`BatchNorm`
      (``channel_dim=1``), copying parameters and buffers exactly; unlike ``SyncBatchNorm`` it accepts padding masks
      and token tensors.
    * normlab norms that sync batch statistics (BatchNorm, RepBN/PRepBN, PowerNorm, UnifiedNorm) get
      ``process_group`` and ``sync_stats=True``.

    Each norm found by :func:`normlab.iter_norms` says what it becomes through its ``synced(process_group)``.

    ``process_group=None`` means the WORLD group at forward time. Returns the converted model (a new module when
    ``model`` itself is a torch BatchNorm), like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> type(convert_sync_norms(net)[1]).__name__
        'BatchNorm'
    """
    for name, module, _ in list(iter_norms(model)):
        new = norm_protocol(module).synced(process_group)
        if new is module:
            continue
        if name == "":
            return new
        parent, _, attr = name.rpartition(".")
        model.get_submodule(parent).add_module(attr, new)
    return model
