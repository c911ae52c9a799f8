"""CIFAR-style ResNet (He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
https://arxiv.org/abs/1512.03385, §4.2): depth ``6n+2``, three stages of ``n`` basic blocks at widths ``w, 2w, 4w``,
global average pool and a linear head.

Three variants share it:

* ``"standard"``: post-activation blocks with any registry norm after every conv (or none), and optionally a
  weight method on every conv (WS for the BCN+WS recipe of https://arxiv.org/abs/1903.10520, weight norm, ...);
* ``"fixup"``: norm-free Fixup blocks (https://arxiv.org/abs/1901.09321), initialised by
  :func:`normlab.weight.fixup_init`;
* ``"nf"``: NF-ResNet blocks with Scaled WS and α/β signal-propagation scaling (https://arxiv.org/abs/2101.08692),
  to be trained with Adaptive Gradient Clipping (:func:`normlab.weight.agc_parameters`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.models._common import DictConfig, check_conv_norm, check_images
from normlab.models.transformer import ModelOutput
from normlab.registry import create_norm
from normlab.weight.fixup import FixupBasicBlock, PadShortcut, fixup_init
from normlab.weight.nf import NONLINEARITY_GAINS, NFBasicBlock, ScaledActivation, nf_expected_stds
from normlab.weight.standardize import ScaledStdConv2d, WSConv2d
from normlab.weight.weight_norm import weight_norm

__all__ = ["RESNET_CONVS", "RESNET_VARIANTS", "BasicBlock", "ResNet", "ResNetConfig"]

RESNET_VARIANTS = ("standard", "fixup", "nf")
RESNET_CONVS = ("plain", "ws", "scaled_ws", "weight_norm")
_DEFAULT_CONV = {"standard": "plain", "fixup": "plain", "nf": "scaled_ws"}
_DEFAULT_SHORTCUT = {"standard": "conv", "fixup": "pad", "nf": "conv"}


@dataclass
class ResNetConfig(DictConfig):
    """Configuration of :class:`ResNet`.

    Args:
        depth: ``6n + 2`` (8, 14, 20, 32, 56, 110, ...); ``n`` blocks per stage.
        width: channels of the first stage (then ``2·width``, ``4·width``). Default 16.
        in_channels: input channels. Default 3.
        num_classes: classes of the linear head. Default 10.
        norm: registry key of the norm after every conv (``variant="standard"``), built as
            ``create_norm(norm, C, channel_dim=1, **norm_kwargs)``; ``None`` = no norm. Must be ``None`` for
            ``"fixup"`` and ``"nf"``.
        norm_kwargs: keyword arguments of the norm.
        variant: ``"standard"``, ``"fixup"`` or ``"nf"`` (see the module docstring).
        conv: weight method of every conv: ``"plain"``, ``"ws"`` (Weight Standardization), ``"scaled_ws"`` or
            ``"weight_norm"``; ``None`` = ``"plain"`` (standard, fixup) or ``"scaled_ws"`` (nf, the only choice).
        conv_kwargs: keyword arguments of the conv layer (``eps``, ``variant`` of WS / Scaled WS).
        shortcut: ``"conv"`` (1×1 conv, plus the norm in the standard variant) or ``"pad"`` (parameter-free
            subsample and zero channels) where stride or width changes; ``None`` = ``"pad"`` for fixup (its CIFAR
            code), ``"conv"`` otherwise. NF blocks always use ``"conv"``.
        activation: ``"relu"`` (standard, fixup); for nf any key of ``NONLINEARITY_GAINS``.
        nf_alpha: α of the NF blocks. Default 0.2.
    """

    depth: int = 20
    width: int = 16
    in_channels: int = 3
    num_classes: int = 10
    norm: str | None = "batch_norm"
    norm_kwargs: dict[str, Any] = field(default_factory=dict)
    variant: str = "standard"
    conv: str | None = None
    conv_kwargs: dict[str, Any] = field(default_factory=dict)
    shortcut: str | None = None
    activation: str = "relu"
    nf_alpha: float = 0.2

    def __post_init__(self) -> None:
        for name in ("depth", "width", "in_channels", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ResNetConfig: expected {name} to be an int >= 1, got {v!r}")
        if self.depth < 8 or (self.depth - 2) % 6 != 0:
            raise ValueError(f"ResNetConfig: expected depth = 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {self.depth}")
        if self.variant not in RESNET_VARIANTS:
            raise ValueError(f"ResNetConfig: expected variant one of {list(RESNET_VARIANTS)}, got {self.variant!r}")
        self._check_norm()
        conv = _DEFAULT_CONV[self.variant] if self.conv is None else self.conv
        if conv not in RESNET_CONVS:
            raise ValueError(f"ResNetConfig: expected conv one of {list(RESNET_CONVS)} or None, got {self.conv!r}")
        if self.variant != "standard" and conv != _DEFAULT_CONV[self.variant]:
            raise ValueError(
                f"ResNetConfig: variant={self.variant!r} uses conv={_DEFAULT_CONV[self.variant]!r}, got conv={conv!r}"
            )
        shortcut = _DEFAULT_SHORTCUT[self.variant] if self.shortcut is None else self.shortcut
        if shortcut not in ("conv", "pad") or (self.variant == "nf" and shortcut != "conv"):
            allowed = ["conv"] if self.variant == "nf" else ["conv", "pad"]
            raise ValueError(f"ResNetConfig: expected shortcut one of {allowed} or None for variant={self.variant!r}, "
                             f"got {self.shortcut!r}")
        acts = list(NONLINEARITY_GAINS) if self.variant == "nf" else ["relu"]
        if self.activation not in acts:
            raise ValueError(f"ResNetConfig: expected activation one of {acts} for variant={self.variant!r}, "
                             f"got {self.activation!r}")
        a = self.nf_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0:
            raise ValueError(f"ResNetConfig: expected nf_alpha to be a number > 0, got {a!r}")
        for name in ("norm_kwargs", "conv_kwargs"):
            if not isinstance(getattr(self, name), Mapping):
                raise TypeError(f"ResNetConfig: expected {name} to be a dict, got {type(getattr(self, name)).__name__}")

    def _check_norm(self) -> None:
        if self.norm is None:
            return
        if self.variant != "standard":
            raise ValueError(f"ResNetConfig: variant={self.variant!r} is norm-free; expected norm=None, got "
                             f"{self.norm!r}")
        check_conv_norm("ResNetConfig", self.norm, optional=True)

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6

    @property
    def resolved_conv(self) -> str:
        return _DEFAULT_CONV[self.variant] if self.conv is None else self.conv

    @property
    def resolved_shortcut(self) -> str:
        return _DEFAULT_SHORTCUT[self.variant] if self.shortcut is None else self.shortcut



ConvFactory = Callable[..., nn.Module]


def _conv_factory(kind: str, kwargs: Mapping[str, Any]) -> ConvFactory:
    def make(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Module:
        common: dict[str, Any] = {"stride": stride, "padding": k // 2, "bias": False}
        if kind == "ws":
            return WSConv2d(c_in, c_out, k, **common, **kwargs)
        if kind == "scaled_ws":
            return ScaledStdConv2d(c_in, c_out, k, **common, **kwargs)
        conv = nn.Conv2d(c_in, c_out, k, **common, **kwargs)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # open_lth's CIFAR ResNet init (fan-in)
        return weight_norm(conv) if kind == "weight_norm" else conv

    return make


class BasicBlock(nn.Module):
    """Post-activation basic block: ``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))``; the shortcut is
    ``norm(conv1x1(x))`` (``"conv"``) or :class:`normlab.weight.PadShortcut` (``"pad"``) when stride or width
    changes, else the identity."""

    def __init__(
        self, c_in: int, c_out: int, stride: int, conv: ConvFactory, norm: Callable[[int], nn.Module], shortcut: str
    ) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv(c_in, c_out, 3, stride), norm(c_out)
        self.conv2, self.norm2 = conv(c_out, c_out, 3), norm(c_out)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            use_conv = shortcut == "conv"
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride), norm(c_out)) if use_conv else PadShortcut(
                c_in, c_out, stride
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet(nn.Module):
    """CIFAR-style ResNet of depth ``6n+2`` (see the module docstring and :class:`ResNetConfig`).

    Module names: ``stem_conv``, ``stem_norm`` (standard), ``stages`` (three ``nn.Sequential`` of blocks),
    ``head`` (the classifier, left out of AGC by :func:`normlab.weight.agc_parameters`). The fixup variant adds
    scalar ``stem_bias`` and ``head_bias`` and is Fixup-initialised at construction; the nf variant has
    ``final_act``.

    Shape:
        input ``(B, in_channels, H, W)`` (any ``H, W`` ≥ 4 for the two stride-2 stages; 16×16 or 32×32 typical);
        ``logits`` ``(B, num_classes)``; ``hidden_states`` the output of every block.

    Example:
        >>> model = ResNet(ResNetConfig(depth=8, width=8, in_channels=1, norm="group_norm",
        ...                             norm_kwargs={"num_groups": 4}))
        >>> model(torch.rand(2, 1, 16, 16)).logits.shape
        torch.Size([2, 10])
    """

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        if not isinstance(config, ResNetConfig):
            raise TypeError(f"ResNet: expected a ResNetConfig, got {type(config).__name__}")
        self.config = c = config
        widths = [c.width, 2 * c.width, 4 * c.width]
        conv = _conv_factory(c.resolved_conv, c.conv_kwargs)
        self.stem_conv = conv(c.in_channels, c.width, 3)
        plan = [(w, 1 if (s == 0 or b > 0) else 2) for s, w in enumerate(widths) for b in range(c.blocks_per_stage)]
        if c.variant == "standard":
            self.stem_norm = self._norm(c.width)
            blocks = self._standard_blocks(plan, conv)
        elif c.variant == "fixup":
            self.stem_bias = nn.Parameter(torch.zeros(1))
            blocks = [FixupBasicBlock(ci, co, s, shortcut=c.resolved_shortcut) for ci, co, s in self._io(plan)]
        else:
            blocks = self._nf_blocks(plan)
            self.final_act = ScaledActivation(c.activation)
        n = c.blocks_per_stage
        self.stages = nn.ModuleList(nn.Sequential(*blocks[i * n : (i + 1) * n]) for i in range(3))
        self.head = nn.Linear(widths[-1], c.num_classes)
        if c.variant == "fixup":
            self.head_bias = nn.Parameter(torch.zeros(1))
            fixup_init(self, classifier="head")
        elif c.variant == "nf":
            nn.init.normal_(self.head.weight, 0.0, 0.01)  # NFNet code: classifier N(0, 0.01), bias 0
            nn.init.zeros_(self.head.bias)

    def _norm(self, channels: int) -> nn.Module:
        if self.config.norm is None:
            return nn.Identity()
        return create_norm(self.config.norm, channels, channel_dim=1, **dict(self.config.norm_kwargs))

    def _io(self, plan: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        out, c_in = [], self.config.width
        for width, stride in plan:
            out.append((c_in, width, stride))
            c_in = width
        return out

    def _standard_blocks(self, plan: list[tuple[int, int]], conv: ConvFactory) -> list[nn.Module]:
        shortcut = self.config.resolved_shortcut
        return [BasicBlock(ci, co, s, conv, self._norm, shortcut) for ci, co, s in self._io(plan)]

    def _nf_blocks(self, plan: list[tuple[int, int]]) -> list[nn.Module]:
        c = self.config
        io = self._io(plan)
        betas = nf_expected_stds([s != 1 or ci != co for ci, co, s in io], alpha=c.nf_alpha)
        return [
            NFBasicBlock(ci, co, s, alpha=c.nf_alpha, expected_std=beta, activation=c.activation,
                         conv_kwargs=dict(c.conv_kwargs))
            for (ci, co, s), beta in zip(io, betas)
        ]

    def reset_fixup_scalars(self) -> None:
        """Fixup: the stem's and the head's scalar biases to 0 (called by :func:`normlab.weight.fixup_init`)."""
        with torch.no_grad():
            for name in ("stem_bias", "head_bias"):
                p = getattr(self, name, None)
                if isinstance(p, Tensor):
                    p.zero_()

    def forward(self, x: Tensor, labels: Tensor | None = None, output_hidden_states: bool = False) -> ModelOutput:
        """Class logits; with ``labels`` the mean cross-entropy."""
        c = self.config
        check_images("ResNet", x, c.in_channels)
        h = self.stem_conv(x)
        if c.variant == "standard":
            h = F.relu(self.stem_norm(h))
        elif c.variant == "fixup":
            h = F.relu(h + self.stem_bias)
        hidden = []
        for stage in self.stages:
            for block in stage:  # type: ignore[attr-defined]
                h = block(h)
                hidden.append(h)
        if c.variant == "nf":
            h = self.final_act(h)
        pooled = h.mean(dim=(2, 3))
        if c.variant == "fixup":
            pooled = pooled + self.head_bias
        logits = self.head(pooled)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden_states=tuple(hidden) if output_hidden_states else None)
