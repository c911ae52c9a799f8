"""Fixup: the factor L^(-1/(2m-2)), the ResNet-110 / ResNet-50 numbers, zero output at init, the block's
forward formula and the errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.models.resnet import ResNet, ResNetConfig
from normlab.weight import FixupBasicBlock, FixupBottleneck, fixup_init, fixup_param_groups, fixup_scale


def test_fixup_scale_spec_numbers() -> None:
    assert fixup_scale(54, 2) == pytest.approx(54**-0.5) == pytest.approx(0.13608, abs=1e-5)  # ResNet-110 CIFAR
    assert fixup_scale(16, 3) == pytest.approx(0.5)  # ResNet-50: 16^(-1/4)


def test_resnet110_stage1_conv1_std_and_zero_output() -> None:
    model = ResNet(ResNetConfig(depth=110, width=16, variant="fixup", norm=None))
    stage1 = [b for b in model.stages[0]]
    assert len(stage1) == 18
    w = torch.cat([b.conv1.weight.reshape(-1) for b in stage1])
    # sqrt(2/(16·9)) · 54^(-1/2) = 0.11785 · 0.13608 = 0.016038
    assert w.std().item() == pytest.approx(0.016038, rel=0.02)
    assert all(torch.count_nonzero(b.conv2.weight) == 0 for s in model.stages for b in s)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    out = model(torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 1]))
    assert torch.equal(out.logits, torch.zeros(2, 10))
    assert out.loss.item() == pytest.approx(math.log(10))  # loss = log K at init


class _Bottlenecks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(FixupBottleneck(8, 4, stride=2), *[FixupBottleneck(16, 4) for _ in range(15)])
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def test_bottleneck_m3_factor_and_unscaled_downsample() -> None:
    torch.manual_seed(0)
    model = _Bottlenecks()
    stem_before = model.stem.weight.detach().clone()
    report = fixup_init(model)
    assert report.num_branches == 16 and report.classifier == "fc"
    assert set(report.scaled.values()) == {0.5}  # 16^(-1/4), on conv1 and conv2 of every block
    assert "blocks.0.conv1" in report.scaled and "blocks.0.conv2" in report.scaled
    assert "blocks.0.conv3" in report.zeroed and "fc" in report.zeroed
    assert report.he_init == ["blocks.0.downsample"]
    assert torch.equal(model.stem.weight, stem_before)  # layers outside branches keep their init
    w = torch.cat([b.conv2.weight.reshape(-1) for b in model.blocks])  # 3×3, 4 out: He std sqrt(2/36)
    assert w.std().item() == pytest.approx(math.sqrt(2 / 36) * 0.5, rel=0.05)
    ds = model.blocks[0].downsample.weight  # 1×1, 16 out: std sqrt(2/16), not scaled
    assert ds.std().item() == pytest.approx(math.sqrt(2 / 16), rel=0.25)


def test_basic_block_forward_formula_and_scalar_reset() -> None:
    block = FixupBasicBlock(4, 8, stride=2)  # pad shortcut: 1x1 avg-pool stride 2, 4 zero channels
    with torch.no_grad():
        for i, name in enumerate(("bias1a", "bias1b", "bias2a", "bias2b")):
            getattr(block, name).fill_(0.1 * (i + 1))
        block.scale.fill_(1.5)
    x = torch.randn(2, 4, 6, 6)
    xa = x + 0.1
    out = F.relu(F.conv2d(xa, block.conv1.weight, stride=2, padding=1) + 0.2)
    out = F.conv2d(out + 0.3, block.conv2.weight, padding=1) * 1.5 + 0.4
    short = torch.cat([xa[:, :, ::2, ::2], torch.zeros(2, 4, 3, 3)], dim=1)
    torch.testing.assert_close(block(x), F.relu(out + short))
    block.reset_fixup_scalars()
    assert block.bias1a.item() == 0 and block.scale.item() == 1


def test_param_groups_put_scalars_at_a_tenth_of_the_lr() -> None:
    model = ResNet(ResNetConfig(depth=8, width=4, variant="fixup", norm=None))
    groups = fixup_param_groups(model, lr=0.1)
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.01])
    assert len(groups[1]["params"]) == 3 * 5 + 2  # 4 biases + scale per block, stem and head bias
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="no scalar \\(one-element\\) parameters"):
        fixup_param_groups(nn.Linear(2, 2), lr=0.1)


def test_errors() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    plain.head = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="no residual branches"):
        fixup_init(plain)

    class OneLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3)
            self.head = nn.Linear(2, 2)

        def residual_branch(self) -> list[nn.Module]:
            return [self.conv]

    with pytest.raises(ValueError, match="residual branch of 1 layer.*m >= 2"):
        fixup_init(OneLayer())
    no_head = nn.Sequential(FixupBasicBlock(2, 2))
    with pytest.raises(ValueError, match=r"fixup_init: .*no child module named one of \['head'"):
        fixup_init(no_head)
    with pytest.raises(ValueError, match="classifier 'x' must be an nn.Linear or a ConvNd, got no such module"):
        fixup_init(no_head, classifier="x")
    with pytest.raises(ValueError, match="branch_layers \\(m\\) to be an int >= 2"):
        fixup_scale(10, 1)
