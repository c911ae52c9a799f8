"""Tests of normlab/walk.py: iter_norms (torch norms, subclasses, outermost only, trait filters) and the fact that a
subclass of a normlab norm and the torch.nn BatchNorms are handled alike by every tool that walks norms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.diagnostics import BatchStatMonitor
from normlab.nn import BatchNorm, LayerNorm, PRepBatchNorm, RMSNorm
from normlab.surgery import convert_sync_norms, fold_norms, recalibrate_stats
from normlab.walk import ADAPTERS, ForeignNorm, is_norm, iter_norms, norm_protocol, spec_of


class MyBN(BatchNorm):
    """A user subclass: no registration of its own, so it is BatchNorm to every tool."""


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.bn = MyBN(8, channel_dim=-1)
        self.tbn = nn.BatchNorm1d(8)
        self.ln = nn.LayerNorm(8)
        self.body = nn.Sequential(RMSNorm(8), PRepBatchNorm(8, total_steps=2))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.tbn(self.bn(self.fc(x)))))


def test_iter_norms_sees_torch_norms_subclasses_and_only_outermost() -> None:
    net = _Net()
    found = [(name, type(m).__name__, spec.name) for name, m, spec in iter_norms(net)]
    assert found == [
        ("bn", "MyBN", "batch_norm"),
        ("tbn", "BatchNorm1d", "torch.nn.BatchNorm"),
        ("ln", "LayerNorm", "torch.nn.LayerNorm"),
        ("body.0", "RMSNorm", "rms_norm"),
        ("body.1", "PRepBatchNorm", "prep_batch_norm"),  # its norm1 (LayerNorm) and norm2 (RepBN) are not yielded
    ]
    torch_norms = nn.ModuleList([nn.BatchNorm2d(3), nn.SyncBatchNorm(3), nn.GroupNorm(1, 3), nn.InstanceNorm3d(3),
                                 nn.RMSNorm(3), nn.BatchNorm3d(3), nn.InstanceNorm1d(3)])
    assert [n for n, _, _ in iter_norms(torch_norms)] == [str(i) for i in range(7)]
    assert [n for n, _, _ in iter_norms(LayerNorm(4))] == [""]  # the model itself, when it is a norm


def test_iter_norms_filters_by_traits_and_refuses_unknown_ones() -> None:
    net = _Net()
    assert [n for n, _, _ in iter_norms(net, batch_dependent=True)] == ["bn", "tbn", "body.1"]
    assert [n for n, _, _ in iter_norms(net, layout="token")] == ["ln", "body.1"]
    assert [n for n, _, _ in iter_norms(net, foldable=True, has_running_stats=True)] == ["bn", "tbn", "body.1"]
    assert [n for n, _, _ in iter_norms(net, custom_backward=True)] == []
    with pytest.raises(KeyError, match=r"iter_norms: unknown trait 'fast'; traits are: layout, has_running_stats"):
        list(iter_norms(net, fast=True))


def test_protocol_lookup_follows_the_mro() -> None:
    assert spec_of(MyBN(4)) is BatchNorm.norm_spec  # type: ignore[attr-defined]
    assert norm_protocol(MyBN(4)).recalibration_plan() is not None  # the module itself speaks the protocol
    proto = norm_protocol(nn.SyncBatchNorm(4))
    assert isinstance(proto, ForeignNorm) and proto.adapter is ADAPTERS[nn.modules.batchnorm._BatchNorm]
    assert not is_norm(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"Linear is not a norm"):
        norm_protocol(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"LayerNorm is not foldable"):
        norm_protocol(nn.LayerNorm(4)).folded_affine()


def test_a_normlab_subclass_works_in_every_tool() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), MyBN(8, channel_dim=-1), nn.Linear(8, 2))
    batches = [torch.randn(16, 4) * 2 + 1 for _ in range(3)]
    report = recalibrate_stats(net, batches)  # refused before iter_norms: it checked `spec.cls is type(m)`
    assert report.recalibrated == ["1"]
    h = net[0](torch.cat(batches))
    torch.testing.assert_close(net[1].running_mean, h.mean(0).detach(), rtol=1e-5, atol=1e-5)
    net.train()
    with BatchStatMonitor(net) as monitor:
        net(batches[0])
    assert {r["module"] for r in monitor.rows()} == {"1"}
    net.eval()
    x = torch.randn(5, 4)
    folded = fold_norms(net).model
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
    assert [r.norm for r in fold_norms(net).folded] == ["1"]
    synced = convert_sync_norms(nn.Sequential(MyBN(8, sync_stats=False)), process_group=None)
    assert synced[0].sync_stats is True and type(synced[0]) is MyBN


def test_batch_stat_monitor_covers_torch_batch_norm_as_recalibration_does() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).train()
    x = torch.randn(32, 4) * 3 + 2
    with torch.no_grad():
        net[1].running_var.fill_(2.0)
    with BatchStatMonitor(net) as monitor:
        net(x)
    rows = {r["variant"]: r["value"] for r in monitor.rows()}
    h = net[0](x).detach().double()
    assert rows["var"] == pytest.approx(float((h.var(0) / 2.0 - 1).abs().mean()), rel=1e-9)
    assert rows["mean"] == pytest.approx(float((h.mean(0).abs() / (2.0 + 1e-5) ** 0.5).mean()), rel=1e-9)
    assert [n for n, _, _ in BatchStatMonitor(net).modules] == recalibrate_stats(net, [x]).recalibrated == ["1"]
