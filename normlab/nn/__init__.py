"""Norm modules. Importing this package registers every norm with :mod:`normlab.registry`."""

from __future__ import annotations

from normlab.nn.batch_norm import BatchNorm
from normlab.nn.dyt import DyT
from normlab.nn.group_norm import GroupNorm, InstanceNorm
from normlab.nn.identity import IdentityNorm
from normlab.nn.layer_norm import LayerNorm
from normlab.nn.power_norm import GroupScaling, PowerNorm
from normlab.nn.rep_batch_norm import PRepBatchNorm, RepBatchNorm
from normlab.nn.rms_norm import CRMSNorm, PartialRMSNorm, RMSNorm, ScaleNorm, SRMSNorm
from normlab.nn.sigma_reparam import SigmaReparamLinear
from normlab.nn.unified_norm import UnifiedNorm

__all__ = [
    "BatchNorm",
    "CRMSNorm",
    "DyT",
    "GroupNorm",
    "GroupScaling",
    "IdentityNorm",
    "InstanceNorm",
    "LayerNorm",
    "PRepBatchNorm",
    "PartialRMSNorm",
    "PowerNorm",
    "RMSNorm",
    "RepBatchNorm",
    "SRMSNorm",
    "ScaleNorm",
    "SigmaReparamLinear",
    "UnifiedNorm",
]
