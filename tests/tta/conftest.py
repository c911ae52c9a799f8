"""Source models for the TTA tests, in float64 with non-trivial source statistics and affine parameters."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from normlab.models import CNNConfig, DigitsCNN, TransformerConfig, ViTEncoder
from normlab.models.resnet import ResNet, ResNetConfig
from tests.tta._reference import AFFINE_NORM_TYPES, BN_TYPES

D = torch.float64


def randomize(model: nn.Module, seed: int = 1) -> nn.Module:
    """Source-like state: random running statistics and affine parameters of every norm; float64; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AFFINE_NORM_TYPES):
                for p, (loc, scale) in ((m.weight, (1.0, 0.2)), (m.bias, (0.0, 0.2))):
                    if p is not None:
                        p.copy_(loc + scale * torch.randn(p.shape, generator=g))
            if isinstance(m, BN_TYPES) and m.running_mean is not None:
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(100)
    return model.to(D).eval()


def digits_torch_bn2d() -> nn.Module:
    """DigitsCNN with ``torch.nn.BatchNorm2d`` in its norm slots (the official codes' layer)."""
    model = DigitsCNN(CNNConfig(channels=[4, 6, 5], num_classes=5))
    model.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in (4, 6, 5))
    return randomize(model)


def resnet_normlab_bn() -> nn.Module:
    """A depth-8 CIFAR ResNet with normlab BatchNorm (channel-first)."""
    return randomize(ResNet(ResNetConfig(depth=8, width=4, in_channels=1, num_classes=5)))


def vit(norm: str) -> nn.Module:
    """A one-block ViT: token norms ``(B, N, C)``."""
    cfg = TransformerConfig(d_model=8, n_layers=1, n_heads=2, image_size=8, patch_size=4, in_channels=1,
                            num_classes=5, norm=norm)
    return randomize(ViTEncoder(cfg))


CONV_MODELS: dict[str, Callable[[], nn.Module]] = {
    "digits_torch_bn2d": digits_torch_bn2d,
    "resnet_normlab_bn": resnet_normlab_bn,
}


def batches(n: int = 2, size: int = 6, shape: tuple[int, ...] = (1, 8, 8), seed: int = 5) -> list[torch.Tensor]:
    """Test batches from a shifted distribution (mean 0.5, std 2)."""
    g = torch.Generator().manual_seed(seed)
    return [(0.5 + 2.0 * torch.randn((size, *shape), generator=g)).to(D) for _ in range(n)]
