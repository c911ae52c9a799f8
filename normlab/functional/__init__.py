"""Pure tensor ops of every norm (no state, no registry). The modules in :mod:`normlab.nn` call these."""

from __future__ import annotations

from normlab.functional.batch_norm import batch_norm
from normlab.functional.dyt import dyt
from normlab.functional.group_norm import group_norm, instance_norm
from normlab.functional.identity import identity
from normlab.functional.layer_norm import layer_norm
from normlab.functional.power_norm import group_scaling, power_norm
from normlab.functional.rep_batch_norm import prep_batch_norm, rep_batch_norm
from normlab.functional.rms_norm import crms_norm, rms_norm, scale_norm
from normlab.functional.unified_norm import unified_norm

__all__ = [
    "batch_norm",
    "crms_norm",
    "dyt",
    "group_norm",
    "group_scaling",
    "identity",
    "instance_norm",
    "layer_norm",
    "power_norm",
    "prep_batch_norm",
    "rep_batch_norm",
    "rms_norm",
    "scale_norm",
    "unified_norm",
]
