"""Fixup initialisation of Zhang, Dauphin, Ma, "Fixup Initialization: Residual Learning Without Normalization"
(ICLR 2019), https://arxiv.org/abs/1901.09321, §3, with its residual blocks.

Rules (paper §3, as the authors' code does them): (1) the classifier and the last layer of every residual branch
start at 0; (2) the other layers inside branches get He init (fan-out) times ``L^(-1/(2m-2))`` (L branches, m layers
per branch); shortcut convs get He init unscaled; (3) a scalar multiplier (1) per branch and scalar biases (0)
before each conv, linear and activation — these live in the blocks (:class:`FixupBasicBlock`,
:class:`FixupBottleneck`). :func:`fixup_init` works on any model whose residual blocks define ``residual_branch()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.weight.agc import find_classifier
from normlab.weight.standardize import _raw_weight

__all__ = [
    "FixupBasicBlock",
    "FixupBottleneck",
    "FixupReport",
    "PadShortcut",
    "fixup_init",
    "fixup_param_groups",
    "fixup_scale",
]

_WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


class PadShortcut(nn.Module):
    """Parameter-free shortcut of the CIFAR ResNets (He et al. 2016, option A; Fixup's CIFAR code): subsample by
    ``stride`` (1×1 average pool) and append zero channels up to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"PadShortcut: expected out_channels >= in_channels, got in_channels={in_channels}, "
                f"out_channels={out_channels}"
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = F.avg_pool2d(x, kernel_size=1, stride=self.stride)
        if self.out_channels > self.in_channels:
            pad = x.new_zeros(x.shape[0], self.out_channels - self.in_channels, *x.shape[2:])
            x = torch.cat([x, pad], dim=1)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _scalar(value: float) -> nn.Parameter:
    return nn.Parameter(torch.full((1,), value))


def _shortcut(in_channels: int, out_channels: int, stride: int, kind: str) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    if kind == "pad":
        return PadShortcut(in_channels, out_channels, stride)
    if kind == "conv":
        return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
    raise ValueError(f"expected shortcut 'pad' or 'conv', got {kind!r}")


class FixupBasicBlock(nn.Module):
    """Fixup basic block (two 3×3 convs, m = 2), as the paper's CIFAR code::

        out = relu(conv1(x + bias1a) + bias1b)
        out = conv2(out + bias2a) * scale + bias2b
        y = relu(out + shortcut(x + bias1a))

    Args:
        in_channels, out_channels: channels; ``stride`` applies to ``conv1`` and the shortcut.
        shortcut: ``"pad"`` (default; the CIFAR code: 1×1 average pool and zero channels) or ``"conv"`` (1×1 conv,
            the ImageNet code), used when stride or width changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, shortcut: str = "pad") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.downsample = _shortcut(in_channels, out_channels, stride, shortcut)
        self.bias1a, self.bias1b, self.bias2a, self.bias2b = (_scalar(0.0) for _ in range(4))
        self.scale = _scalar(1.0)

    def residual_branch(self) -> list[nn.Module]:
        return [self.conv1, self.conv2]

    def reset_fixup_scalars(self) -> None:
        with torch.no_grad():
            for b in (self.bias1a, self.bias1b, self.bias2a, self.bias2b):
                b.zero_()
            self.scale.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        x_in = x + self.bias1a
        out = F.relu(self.conv1(x_in) + self.bias1b)
        out = self.conv2(out + self.bias2a) * self.scale + self.bias2b
        shortcut = self.downsample(x_in) if self.downsample is not None else x
        return F.relu(out + shortcut)


class FixupBottleneck(nn.Module):
    """Fixup bottleneck block (1×1, 3×3, 1×1 convs, m = 3), as the paper's ImageNet code; ``out_channels`` =
    ``width · expansion``; the shortcut is a 1×1 conv (He init, unscaled) when stride or width changes."""

    def __init__(self, in_channels: int, width: int, stride: int = 1, *, expansion: int = 4) -> None:
        super().__init__()
        out_channels = width * expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.downsample = _shortcut(in_channels, out_channels, stride, "conv")
        self.bias1a, self.bias1b, self.bias2a, self.bias2b, self.bias3a, self.bias3b = (
            _scalar(0.0) for _ in range(6)
        )
        self.scale = _scalar(1.0)

    def residual_branch(self) -> list[nn.Module]:
        return [self.conv1, self.conv2, self.conv3]

    def reset_fixup_scalars(self) -> None:
        with torch.no_grad():
            for b in (self.bias1a, self.bias1b, self.bias2a, self.bias2b, self.bias3a, self.bias3b):
                b.zero_()
            self.scale.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        x_in = x + self.bias1a
        out = F.relu(self.conv1(x_in) + self.bias1b)
        out = F.relu(self.conv2(out + self.bias2a) + self.bias2b)
        out = self.conv3(out + self.bias3a) * self.scale + self.bias3b
        shortcut = self.downsample(x_in) if self.downsample is not None else x
        return F.relu(out + shortcut)


def fixup_scale(num_branches: int, branch_layers: int) -> float:
    """``L^(-1/(2m-2))``, the Fixup factor for ``L = num_branches`` branches of ``m = branch_layers`` layers."""
    if isinstance(num_branches, bool) or not isinstance(num_branches, int) or num_branches < 1:
        raise ValueError(f"fixup_scale: expected num_branches (L) to be an int >= 1, got {num_branches!r}")
    if isinstance(branch_layers, bool) or not isinstance(branch_layers, int) or branch_layers < 2:
        raise ValueError(
            f"fixup_scale: expected branch_layers (m) to be an int >= 2 (L^(-1/(2m-2)) is undefined for m=1), "
            f"got {branch_layers!r}"
        )
    return float(num_branches) ** (-1.0 / (2 * branch_layers - 2))


@dataclass
class FixupReport:
    """What :func:`fixup_init` did: ``num_branches`` (L); ``scaled`` layer name → factor; ``zeroed`` (last branch
    layers and the classifier); ``he_init`` (shortcut convs); ``classifier``."""

    num_branches: int
    classifier: str
    scaled: dict[str, float] = field(default_factory=dict)
    zeroed: list[str] = field(default_factory=list)
    he_init: list[str] = field(default_factory=list)


def _he_fan_out_(layer: nn.Module, factor: float = 1.0) -> None:
    w = _raw_weight(layer)
    with torch.no_grad():
        nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
        w.mul_(factor)
        if getattr(layer, "bias", None) is not None:
            layer.bias.zero_()  # type: ignore[union-attr,operator]


def _zero_(layer: nn.Module) -> None:
    with torch.no_grad():
        _raw_weight(layer).zero_()
        if getattr(layer, "bias", None) is not None:
            layer.bias.zero_()  # type: ignore[union-attr,operator]


def _branch_layers(block: nn.Module, block_name: str) -> Sequence[nn.Module]:
    layers = list(block.residual_branch())  # type: ignore[operator]
    for i, layer in enumerate(layers):
        if not isinstance(layer, _WEIGHT_LAYERS):
            raise TypeError(
                f"fixup_init: {block_name}.residual_branch()[{i}] is {type(layer).__name__}; expected nn.Linear or a "
                f"ConvNd"
            )
    if len(layers) < 2:
        raise ValueError(
            f"fixup_init: {block_name} has a residual branch of {len(layers)} layer(s); Fixup's L^(-1/(2m-2)) needs "
            f"m >= 2"
        )
    return layers


def fixup_init(model: nn.Module, *, classifier: str | None = None) -> FixupReport:
    """Fixup-initialise ``model`` in place (see the module docstring).

    A residual block is any submodule with a ``residual_branch()`` method returning its weight layers in order
    (``m`` = their count, per block); ``L`` = the number of such blocks. Its ``downsample`` (a conv, if any) gets
    He init (fan-out) unscaled, and ``reset_fixup_scalars()`` (blocks, and the model itself if it has one) puts
    the scalar biases to 0 and multipliers to 1. Layers outside blocks other than the classifier (the stem) keep
    their init, as in the authors' code.

    Args:
        model: the network.
        classifier: module name of the final classifier, zeroed; default :func:`normlab.weight.find_classifier`.

    Returns:
        a :class:`FixupReport`.

    Raises:
        ValueError: the model has no residual branches, a branch has fewer than 2 layers, no classifier.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fixup_init: expected an nn.Module, got {type(model).__name__}")
    names = {id(m): n for n, m in model.named_modules()}
    blocks = [(n, m) for n, m in model.named_modules() if callable(getattr(m, "residual_branch", None))]
    if not blocks:
        raise ValueError(
            f"fixup_init: {type(model).__name__} has no residual branches (no submodule defines residual_branch(), "
            f"e.g. normlab.weight.FixupBasicBlock); Fixup needs at least one"
        )
    try:
        head_name = classifier if classifier is not None else find_classifier(model)
    except ValueError as exc:
        raise ValueError(f"fixup_init: {exc}") from None
    head = dict(model.named_modules()).get(head_name)
    if not isinstance(head, _WEIGHT_LAYERS):
        got = type(head).__name__ if head is not None else "no such module"
        raise ValueError(f"fixup_init: classifier {head_name!r} must be an nn.Linear or a ConvNd, got {got}")
    report = FixupReport(num_branches=len(blocks), classifier=head_name)
    for block_name, block in blocks:
        layers = _branch_layers(block, block_name)
        factor = fixup_scale(len(blocks), len(layers))
        for layer in layers[:-1]:
            _he_fan_out_(layer, factor)
            report.scaled[names[id(layer)]] = factor
        _zero_(layers[-1])
        report.zeroed.append(names[id(layers[-1])])
        downsample = getattr(block, "downsample", None)
        if isinstance(downsample, nn.Module):
            for sub in downsample.modules():
                if isinstance(sub, _WEIGHT_LAYERS):
                    _he_fan_out_(sub)
                    report.he_init.append(names[id(sub)])
    for module in model.modules():
        reset = getattr(module, "reset_fixup_scalars", None)
        if callable(reset):
            reset()
    _zero_(head)
    report.zeroed.append(head_name)
    return report


def fixup_param_groups(model: nn.Module, lr: float, scalar_lr_factor: float = 0.1) -> list[dict[str, Any]]:
    """Optimizer parameter groups as the Fixup CIFAR training script uses them: the one-element scalar biases and
    multipliers at ``lr · scalar_lr_factor`` (default 1/10), every other parameter at ``lr``.

    >>> opt = torch.optim.SGD(fixup_param_groups(model, lr=0.1), lr=0.1, momentum=0.9)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fixup_param_groups: expected an nn.Module, got {type(model).__name__}")
    for name, value in (("lr", lr), ("scalar_lr_factor", scalar_lr_factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"fixup_param_groups: expected {name} to be a number > 0, got {value!r}")
    scalars: list[nn.Parameter] = []
    others: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        (scalars if p.numel() == 1 else others).append(p)
    if not scalars:
        raise ValueError("fixup_param_groups: the model has no scalar (one-element) parameters; is it a Fixup model?")
    return [{"params": others, "lr": lr}, {"params": scalars, "lr": lr * scalar_lr_factor}]
