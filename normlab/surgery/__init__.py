"""Model surgery: fold norms into linear/conv layers, recalibrate running statistics and sync batch statistics across
ranks (tensor-level functions plus module-level wrappers)."""

from __future__ import annotations

from normlab.surgery.fold import FoldRecord, FoldReport, fold_norms, norm_affine
from normlab.surgery.fold_math import (
    fold_affine_into_conv_input,
    fold_affine_into_conv_output,
    fold_affine_into_linear_input,
    fold_affine_into_linear_output,
)
from normlab.surgery.recalibrate import RecalibrationReport, recalibrate_stats
from normlab.surgery.swap import SwapRecord, SwapReport, swap_norms
from normlab.surgery.sync import convert_sync_norms

__all__ = [
    "FoldRecord",
    "FoldReport",
    "RecalibrationReport",
    "SwapRecord",
    "SwapReport",
    "convert_sync_norms",
    "fold_affine_into_conv_input",
    "fold_affine_into_conv_output",
    "fold_affine_into_linear_input",
    "fold_affine_into_linear_output",
    "fold_norms",
    "norm_affine",
    "recalibrate_stats",
    "swap_norms",
]
