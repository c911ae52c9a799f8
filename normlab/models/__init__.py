"""Small reference models: a decoder-only LM and a ViT-style encoder built from one parameterised block that
expresses every norm placement (Post-/Pre-/Peri-/Sandwich-LN, Mix-LN, LayerNorm Scaling, DeepNorm, NormFormer),
with QK-norm and σReparam options. See ``shared/specs/placement.md`` and the papers named in each module.
"""

from __future__ import annotations

from normlab.models.block import BLOCK_PLACEMENTS, Block
from normlab.models.cnn import CNNConfig, DigitsCNN
from normlab.models.config import NORM_SLOTS, PLACEMENTS, QK_NORMS, TransformerConfig, deepnorm_coefficients
from normlab.models.layers import MLP, Attention
from normlab.models.transformer import DecoderLM, ModelOutput, block_placements
from normlab.models.vit import ViTEncoder

__all__ = [
    "BLOCK_PLACEMENTS",
    "MLP",
    "NORM_SLOTS",
    "PLACEMENTS",
    "QK_NORMS",
    "Attention",
    "Block",
    "CNNConfig",
    "DecoderLM",
    "DigitsCNN",
    "ModelOutput",
    "TransformerConfig",
    "ViTEncoder",
    "block_placements",
    "deepnorm_coefficients",
]
