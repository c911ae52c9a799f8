"""Weight-side normalization and norm-free training: Weight Standardization and Scaled WS (parametrizations and
conv layers), Weight Normalization with data-dependent init, Adaptive Gradient Clipping, Fixup initialisation and
normalizer-free (NF-ResNet) residual blocks. Papers are cited in each module.

These act on weights, gradients or initialisation rather than activations, so they are not in the norm registry;
they compose with any ``nn.Linear`` / ``nn.ConvNd`` and with the norms of :mod:`normlab.nn`.
"""

from __future__ import annotations

from normlab.weight.agc import AGCParam, agc_parameters, attach_agc, clip_grad_agc_, find_classifier, unitwise_norm
from normlab.weight.fixup import (
    FixupBasicBlock,
    FixupBottleneck,
    FixupReport,
    PadShortcut,
    fixup_init,
    fixup_param_groups,
    fixup_scale,
)
from normlab.weight.nf import NONLINEARITY_GAINS, NFBasicBlock, ScaledActivation, nf_expected_stds
from normlab.weight.standardize import (
    SCALED_WS_VARIANTS,
    WS_VARIANTS,
    ScaledStdConv2d,
    ScaledWeightStandardization,
    WeightStandardization,
    WSConv2d,
    bake_weights,
    scaled_standardize_weight,
    scaled_weight_standardization,
    standardize_weight,
    weight_standardization,
)
from normlab.weight.weight_norm import data_dependent_init_, weight_norm, weight_norm_layers

__all__ = [
    "NONLINEARITY_GAINS",
    "SCALED_WS_VARIANTS",
    "WS_VARIANTS",
    "AGCParam",
    "FixupBasicBlock",
    "FixupBottleneck",
    "FixupReport",
    "NFBasicBlock",
    "PadShortcut",
    "ScaledActivation",
    "ScaledStdConv2d",
    "ScaledWeightStandardization",
    "WSConv2d",
    "WeightStandardization",
    "agc_parameters",
    "attach_agc",
    "bake_weights",
    "clip_grad_agc_",
    "data_dependent_init_",
    "find_classifier",
    "fixup_init",
    "fixup_param_groups",
    "fixup_scale",
    "nf_expected_stds",
    "scaled_standardize_weight",
    "scaled_weight_standardization",
    "standardize_weight",
    "unitwise_norm",
    "weight_norm",
    "weight_norm_layers",
    "weight_standardization",
]
