"""Small reference models: a decoder-only LM and a ViT-style encoder built from one parameterised block that
expresses every norm placement (Post-/Pre-/Peri-/Sandwich-LN, Mix-LN, LayerNorm Scaling, DeepNorm, NormFormer),
with QK-norm and σReparam options. The placements are the rows of one table (:mod:`normlab.models.placement`), which
also names their papers.
"""

from __future__ import annotations

from normlab.models.block import BLOCK_PLACEMENTS, Block
from normlab.models.cnn import CNNConfig, DigitsCNN
from normlab.models.config import NORM_SLOTS, PLACEMENTS, QK_NORMS, TransformerConfig, deepnorm_coefficients
from normlab.models.layers import MLP, Attention
from normlab.models.placement import PLACEMENT_SPECS, PlacementSpec, get_placement
from normlab.models.transformer import DecoderLM, ModelOutput, block_placements
from normlab.models.vit import ViTEncoder

__all__ = [
    "BLOCK_PLACEMENTS",
    "MLP",
    "NORM_SLOTS",
    "PLACEMENTS",
    "PLACEMENT_SPECS",
    "QK_NORMS",
    "Attention",
    "Block",
    "CNNConfig",
    "DecoderLM",
    "DigitsCNN",
    "ModelOutput",
    "PlacementSpec",
    "TransformerConfig",
    "ViTEncoder",
    "block_placements",
    "deepnorm_coefficients",
    "get_placement",
]
