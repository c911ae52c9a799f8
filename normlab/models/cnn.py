"""A small CNN for 8×8 images (scikit-learn's digits) with one norm choice for every conv block.

Used by the lab's ``digits`` suite to compare BatchNorm (Ioffe & Szegedy 2015, https://arxiv.org/abs/1502.03167),
GroupNorm (Wu & He 2018, https://arxiv.org/abs/1803.08494), LayerNorm over channels and no norm at a normal and a
micro batch size — the setting where GroupNorm's batch independence matters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from normlab.models._common import DictConfig, check_conv_norm, check_images
from normlab.models.transformer import ModelOutput
from normlab.registry import create_norm

__all__ = ["CNNConfig", "DigitsCNN"]


@dataclass
class CNNConfig(DictConfig):
    """Configuration of :class:`DigitsCNN`.

    Args:
        channels: output channels of the conv blocks (3×3, padding 1); a 2×2 max-pool follows the second block.
        norm: registry key of the norm after every conv, built as
            ``create_norm(norm, C, channel_dim=1, **norm_kwargs)``.
        norm_kwargs: keyword arguments of the norm.
        in_channels: input channels.
        num_classes: classes of the linear head.
    """

    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    norm: str = "batch_norm"
    norm_kwargs: dict[str, Any] = field(default_factory=dict)
    in_channels: int = 1
    num_classes: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.channels, tuple):
            self.channels = list(self.channels)
        if (
            not isinstance(self.channels, list)
            or not self.channels
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels)
        ):
            raise ValueError(f"CNNConfig: expected channels to be a non-empty list of ints >= 1, got {self.channels!r}")
        for name in ("in_channels", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CNNConfig: expected {name} to be an int >= 1, got {v!r}")
        check_conv_norm("CNNConfig", self.norm)
        if not isinstance(self.norm_kwargs, Mapping):
            raise TypeError(f"CNNConfig: expected norm_kwargs to be a dict, got {type(self.norm_kwargs).__name__}")



class DigitsCNN(nn.Module):
    """``[conv3x3 -> norm -> ReLU] × len(channels)`` (max-pool 2×2 after the second block), global average pool,
    linear head.

    Module names: ``convs`` and ``norms`` (``nn.ModuleList``\\ s, one entry per block), ``head``.

    Args:
        config: a :class:`CNNConfig`.

    Shape:
        input ``(B, in_channels, H, W)``; ``logits`` ``(B, num_classes)``; ``hidden_states`` (with
        ``output_hidden_states=True``) the output of every block.

    Example:
        >>> model = DigitsCNN(CNNConfig(norm="group_norm"))
        >>> out = model(torch.rand(4, 1, 8, 8), labels=torch.tensor([0, 1, 2, 3]))
        >>> out.logits.shape, out.loss.shape
        (torch.Size([4, 10]), torch.Size([]))
    """

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        if not isinstance(config, CNNConfig):
            raise TypeError(f"DigitsCNN: expected a CNNConfig, got {type(config).__name__}")
        self.config = config
        convs, norms = [], []
        c_in = config.in_channels
        for c in config.channels:
            convs.append(nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=False))
            norms.append(create_norm(config.norm, c, channel_dim=1, **dict(config.norm_kwargs)))
            c_in = c
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.head = nn.Linear(c_in, config.num_classes)

    def forward(self, x: Tensor, labels: Tensor | None = None, output_hidden_states: bool = False) -> ModelOutput:
        """Class logits; with ``labels`` the mean cross-entropy."""
        check_images("DigitsCNN", x, self.config.in_channels)
        hidden = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.relu(norm(conv(x)))
            if i == 1:
                x = F.max_pool2d(x, 2)
            hidden.append(x)
        logits = self.head(x.mean(dim=(2, 3)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden_states=tuple(hidden) if output_hidden_states else None)
