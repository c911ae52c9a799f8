"""ViT-style encoder (:class:`ViTEncoder`): patch embedding, class token, learned positions and the same
:class:`~normlab.models.block.Block` stack as the decoder, non-causal.

Dosovitskiy et al., "An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929. Placement schemes as in
:mod:`normlab.models.placement`; DeepNorm uses its encoder-only α/β.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.models.config import TransformerConfig
from normlab.models.layers import apply_norm, build_slot_norm
from normlab.models.transformer import (
    DYT_ALPHA_ENCODER,
    ModelOutput,
    build_blocks,
    build_embed_norm,
    init_transformer_weights,
)

__all__ = ["ViTEncoder"]


class ViTEncoder(nn.Module):
    """Image classifier: ``(B, C, H, W)`` -> class logits from the class token.

    Module names: ``embed`` (the ``Conv2d`` patch embedding, kernel = stride = ``patch_size``), ``cls_token``,
    ``pos_embed`` (``(1, 1 + n_patches, d_model)``), ``embed_norm`` (or ``None``), ``blocks``, ``final_norm`` (or
    ``None``), ``head``. Uses ``image_size``, ``patch_size``, ``in_channels``, ``num_classes`` of the config;
    ``vocab_size``, ``max_seq_len`` and ``causal`` are ignored. The QKNorm scale init uses ``T = 1 + n_patches``.
    ``config.embed_norm`` normalises ``[cls, patches] + pos_embed`` (as BERT normalises its embeddings);
    ``config.embed_scale`` (a token-embedding multiplier) has no counterpart here and is refused.

    Example:
        >>> cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=2, image_size=8, patch_size=4, num_classes=5)
        >>> ViTEncoder(cfg)(torch.randn(3, 3, 8, 8)).logits.shape
        torch.Size([3, 5])
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"ViTEncoder: expected a TransformerConfig, got {type(config).__name__}")
        if config.embed_scale is not None:
            raise ValueError(
                "ViTEncoder: embed_scale multiplies DecoderLM's token embeddings (Gemma's √d); the patch embedding "
                "is a learned projection with no such multiplier, expected embed_scale=None, got "
                f"{config.embed_scale!r}"
            )
        self.config = config
        d = config.d_model
        self.n_patches = (config.image_size // config.patch_size) ** 2
        self.embed = nn.Conv2d(config.in_channels, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.n_patches, d))
        self.embed_norm = build_embed_norm(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = build_blocks(config, n_tokens=1 + self.n_patches, arch="encoder")
        self.final_norm = (
            build_slot_norm(config, "final", d, dyt_alpha=DYT_ALPHA_ENCODER) if config.final_norm else None
        )
        self.head = nn.Linear(d, config.num_classes)
        init_transformer_weights(self, config, arch="encoder")
        nn.init.normal_(self.cls_token, std=config.init_std)

    def forward(
        self, pixel_values: Tensor, labels: Tensor | None = None, output_hidden_states: bool = False
    ) -> ModelOutput:
        """Class logits ``(B, num_classes)``; with ``labels`` ``(B,)`` the mean cross-entropy."""
        c, s = self.config.in_channels, self.config.image_size
        if not isinstance(pixel_values, Tensor) or not pixel_values.is_floating_point():
            got = pixel_values.dtype if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise TypeError(f"ViTEncoder: expected pixel_values to be a floating-point tensor, got {got}")
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (c, s, s):
            raise ValueError(
                f"ViTEncoder: expected pixel_values of shape [B, {c}, {s}, {s}], got size {list(pixel_values.shape)}"
            )
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape != pixel_values.shape[:1]):
            shape = list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"ViTEncoder: expected labels of size [{pixel_values.shape[0]}], got {shape}")
        patches = self.embed(pixel_values).flatten(2).transpose(1, 2)  # (B, P, d)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        x = self.drop(apply_norm(self.embed_norm, torch.cat([cls, patches], dim=1) + self.pos_embed, None))
        hidden: list[Tensor] = [x]
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        logits = self.head(apply_norm(self.final_norm, x, None)[:, 0])
        loss = F.cross_entropy(logits, labels.long()) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden_states=tuple(hidden) if output_hidden_states else None)
