"""CIFAR-style ResNet: every variant builds, runs and learns on small images on CPU; the norm slot takes registry
norms; the BN variant folds; the config validates."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from normlab.models.resnet import ResNet, ResNetConfig
from normlab.surgery import fold_norms
from normlab.weight import NFBasicBlock, agc_parameters, attach_agc, data_dependent_init_

CONFIGS = {
    "bn": {},
    "gn_ws": {"norm": "group_norm", "norm_kwargs": {"num_groups": 4}, "conv": "ws"},
    "ln_pad": {"norm": "layer_norm", "shortcut": "pad"},
    "no_norm_weight_norm": {"norm": None, "conv": "weight_norm"},
    "fixup": {"variant": "fixup", "norm": None},
    "nf": {"variant": "nf", "norm": None},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_backward_shapes(name: str) -> None:
    model = ResNet(ResNetConfig(depth=14, width=4, in_channels=1, num_classes=7, **CONFIGS[name]))
    out = model(torch.rand(3, 1, 16, 16), labels=torch.tensor([0, 1, 2]), output_hidden_states=True)
    assert out.logits.shape == (3, 7)
    assert len(out.hidden_states) == 6  # 3 stages × n = 2
    assert [h.shape[1:] for h in out.hidden_states[1::2]] == [(4, 16, 16), (8, 8, 8), (16, 4, 4)]
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_conv_options_reach_every_conv() -> None:
    ws = ResNet(ResNetConfig(depth=8, width=4, conv="ws"))
    convs = [m for m in ws.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 3 * 2 + 2  # stem, two per block, two 1×1 shortcuts
    assert all(parametrize.is_parametrized(m, "weight") for m in convs)
    nf = ResNet(ResNetConfig(depth=8, width=4, variant="nf", norm=None))
    blocks = [m for m in nf.modules() if isinstance(m, NFBasicBlock)]
    assert [round(b.expected_std**2, 6) for b in blocks] == [1.0, 1.04, 1.04]  # stage transitions restart at 1


def test_weight_norm_resnet_takes_data_dependent_init() -> None:
    model = ResNet(ResNetConfig(depth=8, width=4, norm=None, conv="weight_norm"))
    done = data_dependent_init_(model, torch.randn(16, 3, 16, 16))
    assert done[0] == "stem_conv" and len(done) == 1 + 3 * 2 + 2


def _train(model: ResNet, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, agc: bool = False) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if agc:
        attach_agc(opt, agc_parameters(model), clipping=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(x, labels=y).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    ("name", "in_channels", "size", "lr", "agc"),
    [("bn", 1, 16, 0.05, False), ("gn_ws", 3, 16, 0.05, False), ("fixup", 1, 16, 0.05, False),
     ("nf", 3, 32, 0.1, True)],
)
def test_learns_small_images_on_cpu(name: str, in_channels: int, size: int, lr: float, agc: bool) -> None:
    torch.manual_seed(0)
    model = ResNet(ResNetConfig(depth=8, width=8, in_channels=in_channels, num_classes=4, **CONFIGS[name]))
    # Four classes told apart by which image quadrant is bright.
    y = torch.arange(32) % 4
    x = torch.randn(32, in_channels, size, size) * 0.3
    half = size // 2
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, :, r * half : (r + 1) * half, q * half : (q + 1) * half] += 1.0
    losses = _train(model, x, y, steps=40, lr=lr, agc=agc)
    assert losses[-1] < 0.3 * losses[0], losses[::8]


def test_bn_resnet_folds_with_the_same_eval_outputs() -> None:
    model = ResNet(ResNetConfig(depth=8, width=4))
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 16, 16))
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    # fold_norms traces the top-level forward with torch.fx, where the optional labels / output_hidden_states
    # arguments would become proxies; a wrapper that passes only the images keeps them plain Python values.
    report = fold_norms(_Logits(model).eval())
    assert len(report.folded) == 1 + 3 * 2 + 2
    torch.testing.assert_close(report.model(x), model(x).logits, rtol=1e-4, atol=1e-5)


class _Logits(torch.nn.Module):
    def __init__(self, model: ResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def test_config_round_trip_and_errors() -> None:
    cfg = ResNetConfig(depth=20, width=8, norm="group_norm", norm_kwargs={"num_groups": 2})
    assert ResNetConfig.from_dict(cfg.to_dict()) == cfg and cfg.blocks_per_stage == 3
    with pytest.raises(ValueError, match="depth = 6n\\+2 .* got 10"):
        ResNetConfig(depth=10)
    with pytest.raises(ValueError, match="variant='fixup' is norm-free; expected norm=None, got 'batch_norm'"):
        ResNetConfig(variant="fixup")
    with pytest.raises(ValueError, match="token tensors"):
        ResNetConfig(norm="power_norm")
    with pytest.raises(KeyError, match="unknown norm"):
        ResNetConfig(norm="bathc_norm")
    with pytest.raises(ValueError, match="variant='nf' uses conv='scaled_ws', got conv='ws'"):
        ResNetConfig(variant="nf", norm=None, conv="ws")
    with pytest.raises(ValueError, match=r"shortcut one of \['conv'\] or None for variant='nf', got 'pad'"):
        ResNetConfig(variant="nf", norm=None, shortcut="pad")
    with pytest.raises(ValueError, match=r"activation one of \['relu'\] for variant='standard', got 'gelu'"):
        ResNetConfig(activation="gelu")
    with pytest.raises(ValueError, match=r"unknown keys \['blocks'\]"):
        ResNetConfig.from_dict({"blocks": 3})
    with pytest.raises(ValueError, match=r"expected input of shape \[B, 3, H, W\], got \[2, 1, 8, 8\]"):
        ResNet(ResNetConfig(depth=8, width=4))(torch.rand(2, 1, 8, 8))
