"""The inpainting generator of Region Normalization (Yu et al., "Region Normalization for Image Inpainting", AAAI
2020, https://arxiv.org/abs/1911.10375, §3.4 and Fig. 4) at a small size, with a norm slot.

The paper's generator (its released ``G_Net``, an EdgeConnect-style encoder / residual middle / decoder):

* encoder: ``conv7×7(w) → norm → ReLU → conv4×4/2(2w) → norm → ReLU → conv4×4/2(4w) → norm → ReLU`` with **RN-B**
  (the inpainting mask, resized to each feature map by nearest neighbour);
* middle: residual blocks ``conv3×3 (dilation 2) → norm → ReLU → conv3×3 → norm`` plus the skip, with **RN-L**;
* decoder: ``conv → PixelShuffle(2) → norm → ReLU`` twice (RN-L), then ``conv7×7`` and ``(tanh + 1) / 2``.

Here ``w`` (64 in the paper) and the number of residual blocks (8 there) are configurable, and the two norm slots
(``norm`` for the encoder, ``later_norm`` for the middle and decoder) take any channel-first registry norm. The
inpainting mask (**1 = hole**) reaches every norm that takes one: RN-B (``region_norm`` with ``learnable=False``),
given the mask resized by nearest neighbour to its feature map. No other norm gets it (BatchNorm's ``mask`` is a
padding mask with the opposite meaning).

The input is the masked image (holes filled with 1, as the official code does) concatenated with the mask channel.
The loss is the paper's reconstruction term, ``L1(output, image) / mean(mask)`` (the adversarial term, which the
paper adds, is left out here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.models._common import DictConfig, check_conv_norm
from normlab.nn.region_norm import RegionNorm

__all__ = ["InpaintingConfig", "InpaintingGenerator", "InpaintingOutput", "masked_input", "takes_hole_mask"]


@dataclass
class InpaintingConfig(DictConfig):
    """Configuration of :class:`InpaintingGenerator`.

    Args:
        width: channels of the first encoder conv (then ``2·width``, ``4·width``). Default 16 (the paper: 64).
        n_blocks: residual blocks in the middle. Default 2 (the paper: 8).
        dilation: dilation of each block's first conv. Default 2 (the paper's).
        in_channels: image channels (the network sees ``in_channels + 1``: the mask). Default 3.
        norm: registry key of the encoder's norm. Default ``"region_norm"`` (RN-B).
        norm_kwargs: its keyword arguments.
        later_norm: registry key of the middle blocks' and decoder's norm; ``None`` = ``norm`` with
            ``norm_kwargs``. Default ``"region_norm"`` with ``later_norm_kwargs={"learnable": True}`` (RN-L).
        later_norm_kwargs: its keyword arguments (used only when ``later_norm`` is set).
    """

    width: int = 16
    n_blocks: int = 2
    dilation: int = 2
    in_channels: int = 3
    norm: str = "region_norm"
    norm_kwargs: dict[str, Any] = field(default_factory=dict)
    later_norm: str | None = "region_norm"
    later_norm_kwargs: dict[str, Any] = field(default_factory=lambda: {"learnable": True})

    def __post_init__(self) -> None:
        for name in ("width", "in_channels", "dilation"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"InpaintingConfig: expected {name} to be an int >= 1, got {v!r}")
        if isinstance(self.n_blocks, bool) or not isinstance(self.n_blocks, int) or self.n_blocks < 0:
            raise ValueError(f"InpaintingConfig: expected n_blocks to be an int >= 0, got {self.n_blocks!r}")
        check_conv_norm("InpaintingConfig", self.norm)
        check_conv_norm("InpaintingConfig", self.later_norm, optional=True)
        for name in ("norm_kwargs", "later_norm_kwargs"):
            if not isinstance(getattr(self, name), Mapping):
                raise TypeError(f"InpaintingConfig: expected {name} to be a dict, got "
                                f"{type(getattr(self, name)).__name__}")

    def later(self) -> tuple[str, dict[str, Any]]:
        """The middle's and decoder's norm key and keyword arguments (``later_norm=None``: the encoder's)."""
        if self.later_norm is None:
            return self.norm, dict(self.norm_kwargs)
        return self.later_norm, dict(self.later_norm_kwargs)


@dataclass
class InpaintingOutput:
    """What :class:`InpaintingGenerator` returns.

    Attributes:
        image: ``(B, C, H, W)`` in ``(0, 1)``, the generator's output everywhere (not yet composited).
        loss: ``L1(image, target) / mean(mask)`` when a target is given, else ``None``.
        hidden_states: with ``output_hidden_states=True``: the encoder's output and each residual block's.
    """

    image: Tensor
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


def takes_hole_mask(module: nn.Module) -> bool:
    """Whether a norm takes the inpainting mask (1 = hole): RN-B. RN-L finds its regions in the features."""
    return isinstance(module, RegionNorm) and not module.learnable


def masked_input(image: Tensor, mask: Tensor) -> Tensor:
    """The generator's input: ``image`` with its holes filled with 1 (the official code's convention) and the mask
    as an extra channel; ``mask`` is ``(B, 1, H, W)``, 1 = hole."""
    return torch.cat([image * (1.0 - mask) + mask, mask], dim=1)


def _norm(key: str, channels: int, kwargs: Mapping[str, Any]) -> nn.Module:
    from normlab.registry import create_norm

    return create_norm(key, channels, channel_dim=1, **dict(kwargs))


class _NormSlot(nn.Module):
    """A norm that gets the inpainting mask (resized by nearest neighbour to the feature map) when it takes one."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if not takes_hole_mask(self.norm):
            return self.norm(x)
        if tuple(mask.shape[2:]) != tuple(x.shape[2:]):
            mask = F.interpolate(mask, size=tuple(x.shape[2:]), mode="nearest")
        return self.norm(x, mask=mask)


class _ResBlock(nn.Module):
    """``x + norm2(conv3×3(relu(norm1(conv3×3_dilated(x)))))`` with reflection padding, as in the paper's code."""

    def __init__(self, channels: int, dilation: int, key: str, kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, padding_mode="reflect")
        self.norm1 = _NormSlot(_norm(key, channels, kwargs))
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.norm2 = _NormSlot(_norm(key, channels, kwargs))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x), mask))
        return x + self.norm2(self.conv2(h), mask)


class InpaintingGenerator(nn.Module):
    """The RN paper's generator at a configurable size (see the module docstring and :class:`InpaintingConfig`).

    Module names: ``enc_convs``, ``enc_norms`` (three each), ``blocks`` (residual blocks with ``norm1``, ``norm2``),
    ``dec_convs``, ``dec_norms`` (two each), ``out_conv``. Each norm slot is a wrapper whose ``.norm`` is the
    registry norm.

    Shape:
        ``image`` ``(B, C, H, W)`` in ``[0, 1]`` with ``H, W`` multiples of 4 (≥ 8 for the reflection padding);
        ``mask`` ``(B, 1, H, W)`` or ``(B, H, W)``, 1 = hole; ``target`` as ``image`` (the uncorrupted image; default
        ``image``). The image under the hole is never seen: the input is :func:`masked_input`.

    Example:
        >>> g = InpaintingGenerator(InpaintingConfig(width=8, n_blocks=1))
        >>> img, hole = torch.rand(2, 3, 16, 16), torch.zeros(2, 1, 16, 16)
        >>> hole[:, :, 4:10, 4:10] = 1
        >>> out = g(img, hole, target=img)
        >>> out.image.shape, out.loss.shape
        (torch.Size([2, 3, 16, 16]), torch.Size([]))
    """

    def __init__(self, config: InpaintingConfig) -> None:
        super().__init__()
        if not isinstance(config, InpaintingConfig):
            raise TypeError(f"InpaintingGenerator: expected an InpaintingConfig, got {type(config).__name__}")
        self.config = c = config
        w = c.width
        widths = [w, 2 * w, 4 * w]
        self.enc_convs = nn.ModuleList([
            nn.Conv2d(c.in_channels + 1, w, 7, padding=3, padding_mode="reflect"),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1),
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1),
        ])
        self.enc_norms = nn.ModuleList(_NormSlot(_norm(c.norm, ch, c.norm_kwargs)) for ch in widths)
        key, kwargs = c.later()
        self.blocks = nn.ModuleList(_ResBlock(4 * w, c.dilation, key, kwargs) for _ in range(c.n_blocks))
        # Upsampling as the released code: a conv to 4x the channels, then PixelShuffle(2).
        self.dec_convs = nn.ModuleList([nn.Conv2d(4 * w, 4 * 2 * w, 3, padding=1),
                                        nn.Conv2d(2 * w, 4 * w, 3, padding=1)])
        self.dec_norms = nn.ModuleList(_NormSlot(_norm(key, ch, kwargs)) for ch in (2 * w, w))
        self.out_conv = nn.Conv2d(w, c.in_channels, 7, padding=3, padding_mode="reflect")

    def _check(self, image: Tensor, mask: Tensor) -> Tensor:
        c = self.config.in_channels
        if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[1] != c:
            got = list(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"InpaintingGenerator: expected image of shape [B, {c}, H, W], got {got}")
        if image.shape[2] % 4 or image.shape[3] % 4 or min(image.shape[2:]) < 8:
            raise ValueError(f"InpaintingGenerator: expected H and W multiples of 4 and >= 8, got image of shape "
                             f"{list(image.shape)}")
        if not isinstance(mask, Tensor):
            raise TypeError(f"InpaintingGenerator: expected mask to be a torch.Tensor, got {type(mask).__name__}")
        m = mask.unsqueeze(1) if mask.dim() == 3 else mask
        if m.dim() != 4 or m.shape[0] != image.shape[0] or m.shape[1] != 1 or m.shape[2:] != image.shape[2:]:
            want = [image.shape[0], 1, *image.shape[2:]]
            raise ValueError(f"InpaintingGenerator: expected mask of shape [B, 1, H, W] = {want}, got "
                             f"{list(mask.shape)}")
        return m.to(image.dtype)

    def forward(self, image: Tensor, mask: Tensor, target: Tensor | None = None,
                output_hidden_states: bool = False) -> InpaintingOutput:
        """The inpainted image; with ``target`` the loss ``L1(output, target) / mean(mask)``."""
        m = self._check(image, mask)
        h = masked_input(image, m)
        for conv, norm in zip(self.enc_convs, self.enc_norms):
            h = F.relu(norm(conv(h), m))
        hidden = [h]
        for block in self.blocks:
            h = block(h, m)
            hidden.append(h)
        for conv, norm in zip(self.dec_convs, self.dec_norms):
            h = F.relu(norm(F.pixel_shuffle(conv(h), 2), m))
        out = (torch.tanh(self.out_conv(h)) + 1.0) / 2.0
        loss = None
        if target is not None:
            if target.shape != image.shape:
                raise ValueError(f"InpaintingGenerator: expected target of shape {list(image.shape)} (the image's), "
                                 f"got {list(target.shape)}")
            loss = F.l1_loss(out, target) / m.mean().clamp_min(1e-6)
        return InpaintingOutput(out, loss, tuple(hidden) if output_hidden_states else None)
