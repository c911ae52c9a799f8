"""Norm modules. Importing this package registers every norm with :mod:`normlab.registry`."""

from __future__ import annotations

from normlab.nn.batch_norm import BatchNorm
from normlab.nn.dyt import DyT
from normlab.nn.group_norm import GroupNorm, InstanceNorm
from normlab.nn.identity import IdentityNorm
from normlab.nn.layer_norm import LayerNorm
from normlab.nn.rms_norm import CRMSNorm, PartialRMSNorm, RMSNorm, ScaleNorm, SRMSNorm

__all__ = [
    "BatchNorm",
    "CRMSNorm",
    "DyT",
    "GroupNorm",
    "IdentityNorm",
    "InstanceNorm",
    "LayerNorm",
    "PartialRMSNorm",
    "RMSNorm",
    "SRMSNorm",
    "ScaleNorm",
]
