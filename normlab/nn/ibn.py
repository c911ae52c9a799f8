"""IBN, the Instance-Batch Normalization layer of IBN-Net-a (Pan, Luo, Shi, Tang, "Two at Once: Enhancing Learning
and Generalization Capacities via IBN-Net", ECCV 2018, https://arxiv.org/abs/1807.09441)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.functional.ibn import ibn
from normlab.nn._base import BatchStatView, NormBase, RecalibrationPlan, bn_recalibration_plan, check_unit
from normlab.nn.batch_norm import bn_stats
from normlab.registry import Paper, register_norm

__all__ = ["IBN"]

# The official module (XingangPan/IBN-Net, ``ibnnet/modules.py``) holds an ``IN`` and a ``BN`` submodule; their
# state-dict keys are mapped onto this module's flat parameters on load.
_OFFICIAL_KEYS = ("weight", "bias")
_OFFICIAL_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@register_norm(
    "ibn", functional=ibn, layout="channel_first",
    has_running_stats=True, batch_dependent=True, foldable=False,
    aliases=("ibn_a", "instance_batch_norm"),
    paper=Paper("Two at Once: Enhancing Learning and Generalization Capacities via IBN-Net",
                "https://arxiv.org/abs/1807.09441"),
    samples=({"ratio": 0.25}, {"ratio": 0.8, "momentum": None}, {"affine": False}),
    description="InstanceNorm on the first ratio*C channels, BatchNorm on the rest (IBN-Net-a)",
)
class IBN(NormBase):
    r"""IBN-a's normalization: InstanceNorm on the first ``h = ⌊ratio·C⌋`` channels, BatchNorm on the other ``C − h``.

    Paper: Pan, Luo, Shi, Tang, "Two at Once: Enhancing Learning and Generalization Capacities via IBN-Net",
    https://arxiv.org/abs/1807.09441 (Section 3.2, IBN-a: replaces the first BatchNorm of a residual block).

    .. math:: y = \mathrm{concat}\big(\mathrm{IN}(x_{[:, :h]}),\ \mathrm{BN}(x_{[:, h:]})\big)

    The IN half takes per-sample statistics over the positions in train **and** eval mode and keeps no running
    statistics (``torch.nn.InstanceNorm2d(h, affine=True)``); the BN half is ``torch.nn.BatchNorm2d(C − h)``: biased
    batch statistics in training, running buffers (size ``C − h``, unbiased variance) in eval. ``weight`` and
    ``bias`` hold both halves' affine parameters in channel order. A state dict of the official module (keys
    ``IN.weight``, ``IN.bias``, ``BN.weight``, ``BN.bias``, ``BN.running_mean``, ...) loads as well.

    Not foldable as a whole: the IN half depends on the sample. :meth:`recalibration_plan` and
    :meth:`batch_stat_view` cover the BN half's running statistics.

    Args:
        num_features: channel count ``C`` (any, odd included).
        ratio: fraction of channels normalised by IN; ``h = int(C·ratio)`` must leave at least one channel for
            each half. Default ``0.5``.
        eps: both halves' eps. Default ``1e-5``.
        momentum: the BN half's EMA factor (``None``: cumulative average). Default ``0.1``.
        affine: learn ``weight`` (init 1) and ``bias`` (init 0). Default ``True`` (the official layer always has
            them).
        channel_dim: must be ``1``.
        process_group: ``torch.distributed`` group sharing the BN half's batch statistics (``None`` = WORLD).
        sync_stats: all-reduce the BN half's statistics in training. Default ``True``.

    Shape:
        input ``(N, C, L, *)`` with at least one spatial axis (channels-last accepted); output the same shape and
        dtype.

    Example:
        >>> m = IBN(5)  # 2 IN channels, 3 BN channels
        >>> m.instance_channels, m.running_mean.shape
        (2, torch.Size([3]))
        >>> m(torch.randn(2, 5, 4, 4)).shape
        torch.Size([2, 5, 4, 4])
    """

    def __init__(
        self, num_features: int, *, ratio: float = 0.5, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, channel_dim: int = 1, process_group: Any = None, sync_stats: bool = True,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, channel_dim, "channel_first")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(f"ibn: expected ratio to be a float in (0, 1), got {type(ratio).__name__}")
        h = int(num_features * ratio)
        if not 0 < h < num_features:
            raise ValueError(
                f"ibn: ratio={ratio!r} with num_features={num_features} gives {h} InstanceNorm and "
                f"{num_features - h} BatchNorm channels; expected at least 1 channel in each half"
            )
        self.ratio, self.instance_channels, self.eps = ratio, h, eps
        self.momentum = check_unit("ibn", "momentum", momentum, optional=True)
        self.process_group, self.sync_stats = process_group, sync_stats
        self._init_affine(num_features, weight=affine, bias=affine, device=device, dtype=dtype)
        self._init_stats(bn_stats(num_features - h), device=device, dtype=dtype)
        self.reset_parameters()

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    syncs_batch_stats = True
    rejects_mask = True

    def recalibration_plan(self) -> RecalibrationPlan | None:
        """The BN half's: ``momentum = 1`` writes its batch mean and unbiased variance."""
        return bn_recalibration_plan(self)

    def batch_stat_view(self) -> BatchStatView | None:
        """The BN half's running statistics against the statistics of channels ``[h, C)`` of the input."""
        h = self.instance_channels
        return BatchStatView(self.running_var, self.running_mean, float(self.eps), 1,
                             transform=lambda x: x.narrow(1, h, x.shape[1] - h))

    def _upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int | None) -> None:
        """Map the official module's ``IN.*`` / ``BN.*`` keys onto ``weight``, ``bias`` and the BN buffers."""
        if not any(k.startswith(prefix + "IN.") or k.startswith(prefix + "BN.") for k in state_dict):
            return
        for name in _OFFICIAL_KEYS:
            parts = [state_dict.pop(prefix + f"{half}.{name}", None) for half in ("IN", "BN")]
            if parts[0] is not None and parts[1] is not None:
                state_dict[prefix + name] = torch.cat([parts[0], parts[1]])
        for name in _OFFICIAL_BN_BUFFERS:
            if prefix + f"BN.{name}" in state_dict:
                state_dict[prefix + name] = state_dict.pop(prefix + f"BN.{name}")
