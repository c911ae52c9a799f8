"""Small reference models: a decoder-only LM and a ViT-style encoder built from one parameterised block that
expresses every norm placement (Post-/Pre-/Peri-/Sandwich-LN, Mix-LN, LayerNorm Scaling, DeepNorm, NormFormer),
with QK-norm and σReparam options; a CIFAR-style ResNet with a norm slot and its Fixup / NF variants; the Region
Normalization inpainting generator at a small size. The placements are the rows of one table
(:mod:`normlab.models.placement`), which also names their papers.
"""

from __future__ import annotations

from normlab.models.block import BLOCK_PLACEMENTS, Block
from normlab.models.cnn import CNNConfig, DigitsCNN
from normlab.models.config import NORM_SLOTS, PLACEMENTS, QK_NORMS, TransformerConfig, deepnorm_coefficients
from normlab.models.inpainting import InpaintingConfig, InpaintingGenerator, InpaintingOutput
from normlab.models.layers import MLP, Attention
from normlab.models.placement import PLACEMENT_SPECS, PlacementSpec, get_placement
from normlab.models.resnet import RESNET_CONVS, RESNET_VARIANTS, BasicBlock, ResNet, ResNetConfig
from normlab.models.transformer import DecoderLM, ModelOutput, block_placements
from normlab.models.vit import ViTEncoder

__all__ = [
    "BLOCK_PLACEMENTS",
    "MLP",
    "NORM_SLOTS",
    "PLACEMENTS",
    "PLACEMENT_SPECS",
    "QK_NORMS",
    "RESNET_CONVS",
    "RESNET_VARIANTS",
    "Attention",
    "BasicBlock",
    "Block",
    "CNNConfig",
    "DecoderLM",
    "DigitsCNN",
    "InpaintingConfig",
    "InpaintingGenerator",
    "InpaintingOutput",
    "ModelOutput",
    "PlacementSpec",
    "ResNet",
    "ResNetConfig",
    "TransformerConfig",
    "ViTEncoder",
    "block_placements",
    "deepnorm_coefficients",
    "get_placement",
]
