"""Functional IBN (Pan, Luo, Shi, Tang, "Two at Once: Enhancing Learning and Generalization Capacities via
IBN-Net", ECCV 2018, https://arxiv.org/abs/1807.09441): InstanceNorm on the first channels, BatchNorm on the rest.

See :class:`normlab.nn.IBN`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.functional._vision import channel_first
from normlab.functional.batch_norm import batch_norm
from normlab.functional.group_norm import instance_norm

__all__ = ["ibn"]


def _part(t: Tensor | None, start: int, length: int) -> Tensor | None:
    return None if t is None else t.narrow(0, start, length)


def ibn(
    x: Tensor, num_features: int, instance_channels: int, running_mean: Tensor | None = None,
    running_var: Tensor | None = None, weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
    momentum: float | None = 0.1, eps: float = 1e-5, num_batches_tracked: Tensor | None = None, channel_dim: int = 1,
    process_group: Any = None, sync_stats: bool = True,
) -> Tensor:
    """IBN-a's layer: channels ``[0, h)`` through InstanceNorm (per-sample statistics in train and eval), channels
    ``[h, C)`` through BatchNorm (running buffers of size ``C − h``), concatenated in that order; ``weight`` and
    ``bias`` cover all ``C`` channels. See :class:`normlab.nn.IBN`."""
    op = "ibn"
    channel_first(x, num_features, channel_dim, op, min_dim=3)
    h = instance_channels
    if isinstance(h, bool) or not isinstance(h, int) or not 0 < h < num_features:
        raise ValueError(f"{op}: expected instance_channels in [1, {num_features - 1}] (both halves non-empty), "
                         f"got {h!r}")
    rest = num_features - h
    # BatchNorm first: it is the half that refuses a training batch with one value per channel.
    y_bn = batch_norm(
        x.narrow(1, h, rest), rest, running_mean=running_mean, running_var=running_var,
        weight=_part(weight, h, rest), bias=_part(bias, h, rest), training=training, momentum=momentum, eps=eps,
        channel_dim=1, num_batches_tracked=num_batches_tracked, process_group=process_group, sync_stats=sync_stats,
    )
    if x.numel() == 0:  # torch's instance_norm kernel fails on an empty batch
        return x.clone()
    y_in = instance_norm(x.narrow(1, 0, h), h, weight=_part(weight, 0, h), bias=_part(bias, 0, h), eps=eps)
    return torch.cat([y_in, y_bn], dim=1)
