"""normlab: normalization layers for PyTorch, in one registry, with placements, surgery, diagnostics and a lab.

Public API::

    import normlab
    norm = normlab.create_norm("rms_norm", 768)
    [spec.name for spec in normlab.list_norms(foldable=True)]
"""

from __future__ import annotations

from normlab import diagnostics, functional, models, nn, surgery
from normlab.nn import (
    BatchNorm,
    CRMSNorm,
    DyT,
    GroupNorm,
    IdentityNorm,
    InstanceNorm,
    LayerNorm,
    PartialRMSNorm,
    PowerNorm,
    PRepBatchNorm,
    RepBatchNorm,
    RMSNorm,
    ScaleNorm,
    SRMSNorm,
    UnifiedNorm,
)
from normlab.registry import NormSpec, Paper, create_norm, get_norm, list_norms, register_norm
from normlab.walk import iter_norms

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "CRMSNorm",
    "DyT",
    "GroupNorm",
    "IdentityNorm",
    "InstanceNorm",
    "LayerNorm",
    "NormSpec",
    "Paper",
    "PartialRMSNorm",
    "PowerNorm",
    "PRepBatchNorm",
    "RepBatchNorm",
    "RMSNorm",
    "SRMSNorm",
    "ScaleNorm",
    "UnifiedNorm",
    "__version__",
    "create_norm",
    "diagnostics",
    "functional",
    "get_norm",
    "iter_norms",
    "list_norms",
    "models",
    "nn",
    "register_norm",
    "surgery",
]
