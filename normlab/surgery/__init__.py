"""Model surgery: fold norms into linear/conv layers, recalibrate running statistics, sync batch statistics across
ranks, fold LayerNorm affines into the residual stream's readers (TransformerLens semantics) and convert Pre-LN models
to Pre-RMSNorm / Pre-CRMSNorm exactly (tensor-level functions plus module-level wrappers), and remove LayerNorms by
fine-tuning (Baroni et al. 2025: prepare, calibrate σ̄, a staged schedule, export)."""

from __future__ import annotations

from normlab.surgery._residual import STREAM_MAPS, StreamChange, StreamMap, StreamSurgeryReport
from normlab.surgery.convert import PadLastAxis, ZeroMean, convert_to_crms_norm, convert_to_rms_norm
from normlab.surgery.fold import FoldRecord, FoldReport, fold_norms, norm_affine
from normlab.surgery.fold_math import (
    fold_affine_into_conv_input,
    fold_affine_into_conv_output,
    fold_affine_into_linear_input,
    fold_affine_into_linear_output,
)
from normlab.surgery.io import load, save
from normlab.surgery.ln_export import CenteredAffine, export_removed_ln
from normlab.surgery.ln_fold import center_unembed, center_writing_weights, fold_ln, fold_value_biases
from normlab.surgery.ln_removal import (
    LNRemoval,
    LNSwitch,
    RemovalSchedule,
    SplitFakeLayerNorm,
    StdAuxLoss,
    calibrate_sigma,
    prepare_ln_removal,
)
from normlab.surgery.recalibrate import RecalibrationReport, recalibrate_stats
from normlab.surgery.stream_math import (
    center_unembed_weights,
    center_writer,
    compress_reader,
    compress_writer,
    fold_ln_into_reader,
    fold_value_bias,
)
from normlab.surgery.swap import SwapRecord, SwapReport, swap_norms
from normlab.surgery.sync import convert_sync_norms

__all__ = [
    "STREAM_MAPS",
    "CenteredAffine",
    "FoldRecord",
    "FoldReport",
    "LNRemoval",
    "LNSwitch",
    "PadLastAxis",
    "RecalibrationReport",
    "RemovalSchedule",
    "SplitFakeLayerNorm",
    "StdAuxLoss",
    "StreamChange",
    "StreamMap",
    "StreamSurgeryReport",
    "SwapRecord",
    "SwapReport",
    "ZeroMean",
    "calibrate_sigma",
    "center_unembed",
    "center_unembed_weights",
    "center_writer",
    "center_writing_weights",
    "compress_reader",
    "compress_writer",
    "convert_sync_norms",
    "convert_to_crms_norm",
    "convert_to_rms_norm",
    "export_removed_ln",
    "fold_affine_into_conv_input",
    "fold_affine_into_conv_output",
    "fold_affine_into_linear_input",
    "fold_affine_into_linear_output",
    "fold_ln",
    "fold_ln_into_reader",
    "fold_norms",
    "fold_value_bias",
    "fold_value_biases",
    "load",
    "norm_affine",
    "prepare_ln_removal",
    "recalibrate_stats",
    "save",
    "swap_norms",
]
