"""IBN (IBN-Net-a, https://arxiv.org/abs/1807.09441): equal to the official layer (torch InstanceNorm2d on the first
int(C·ratio) channels + BatchNorm2d on the rest) in train and eval, loading its state dict; ratio errors; the BN
half's protocol."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.diagnostics import BatchStatMonitor
from normlab.nn import IBN
from normlab.surgery import fold_norms, recalibrate_stats


class OfficialIBN(nn.Module):
    """The official layer's structure (XingangPan/IBN-Net ``ibnnet/modules.py``), written here for comparison."""

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(a.contiguous()), self.BN(b.contiguous())], dim=1)


@pytest.mark.parametrize(("channels", "ratio"), [(6, 0.5), (7, 0.5), (9, 0.3), (5, 0.9)])
def test_matches_the_official_layer_and_loads_its_state_dict(channels: int, ratio: float) -> None:
    official = OfficialIBN(channels, ratio)
    with torch.no_grad():
        for p in official.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ours = IBN(channels, ratio=ratio)
    ours.load_state_dict(official.state_dict(), strict=True)
    assert ours.instance_channels == official.half
    for step in range(3):
        x = torch.randn(4, channels, 5, 6) * (step + 1) + step
        torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, official.BN.running_var)
    assert int(ours.num_batches_tracked) == 3
    ours.eval(), official.eval()
    x = torch.randn(2, channels, 5, 6)
    torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-5)


def test_odd_channels_split_as_the_official_int() -> None:
    assert IBN(7).instance_channels == 3 and IBN(7).running_mean.shape == (4,)
    assert IBN(64, ratio=0.25).instance_channels == 16


@pytest.mark.parametrize(("channels", "ratio", "h"), [(6, 0.1, 0), (6, 1.0, 6), (1, 0.5, 0), (4, 0.0, 0)])
def test_a_ratio_that_empties_a_half_is_refused(channels: int, ratio: float, h: int) -> None:
    with pytest.raises(ValueError, match=rf"ratio={ratio} with num_features={channels} gives {h} InstanceNorm and "
                                         rf"{channels - h} BatchNorm channels; expected at least 1 channel in each"):
        IBN(channels, ratio=ratio)
    with pytest.raises(TypeError, match=r"expected ratio to be a float in \(0, 1\), got str"):
        IBN(6, ratio="0.5")  # type: ignore[arg-type]


def test_instance_half_is_per_sample_in_eval_and_batch_half_uses_running_stats() -> None:
    m = IBN(4).eval()
    x = torch.randn(3, 4, 5, 5)
    y = m(x)
    torch.testing.assert_close(y[:, :2], nn.functional.instance_norm(x[:, :2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, 2:], x[:, 2:] / (1 + 1e-5) ** 0.5)


def test_recalibration_and_monitor_cover_the_batch_half() -> None:
    net = nn.Sequential(nn.Conv2d(3, 5, 1), IBN(5))
    x = torch.randn(16, 3, 6, 6)
    recalibrate_stats(net, [x])
    with torch.no_grad():
        h = net[0](x)[:, 2:]
    torch.testing.assert_close(net[1].running_mean, h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, h.var((0, 2, 3)), rtol=1e-5, atol=1e-6)
    with BatchStatMonitor(net) as monitor:
        net.train()(x)
    assert {r["variant"] for r in monitor.rows()} == {"var", "mean"}
    assert all(r["value"] < 1e-4 for r in monitor.rows())  # running = this batch's statistics
    report = fold_norms(net.eval(), strict=False)
    assert not report.folded and len(report.refused) == 1
