"""Batch-Channel Normalization (https://arxiv.org/abs/1903.10520): equal to BatchNorm2d followed by the official
per-group normalization; the estimated-BN micro-batch mode (its recursion, forward and stop-gradient backward
against the float64 reference, which the contract suite's gradcheck cannot express); protocol."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.functional import batch_channel_norm
from normlab.nn import BatchChannelNorm
from normlab.surgery import fold_norms, recalibrate_stats
from normlab.testing.reference_batch_channel_norm import batch_channel_norm as reference
from normlab.testing.reference_batch_channel_norm import estimated_stats

F64 = torch.float64


def _randomised(m: BatchChannelNorm) -> BatchChannelNorm:
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
        m.running_mean.normal_(0.0, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    return m


def test_equals_batchnorm2d_then_the_official_group_part() -> None:
    m = _randomised(BatchChannelNorm(8, num_groups=4))
    bn = nn.BatchNorm2d(8)
    bn.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("group_")})

    def official(x: torch.Tensor) -> torch.Tensor:
        out = bn(x).reshape(1, x.shape[0] * 4, -1)  # the official BCNorm's view + torch.batch_norm
        out = F.batch_norm(out, None, None, training=True, eps=1e-5).reshape(x.shape[0], 4, -1)
        return (out * m.group_weight.reshape(1, 4, 1) + m.group_bias.reshape(1, 4, 1)).reshape(x.shape)

    for mode in (True, True, False):
        m.train(mode), bn.train(mode)
        x = torch.randn(3, 8, 5, 4) * 2 + 1
        torch.testing.assert_close(m(x), official(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.running_var, bn.running_var)


def test_estimated_statistics_follow_the_official_recursion() -> None:
    m = BatchChannelNorm(2, num_groups=1, estimate=True, moving_speed=0.5, affine=False, dtype=F64)
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 4.0]]]], dtype=F64)  # N=1, C=2, 1x2: a micro-batch
    m(x)
    # mean(x) = [2, 2]; mean((x - 0)^2) = [5, 8]; r = 0.5 from (0, 1).
    torch.testing.assert_close(m.running_mean, torch.tensor([1.0, 1.0], dtype=F64))
    torch.testing.assert_close(m.running_var, torch.tensor([3.0, 4.5], dtype=F64))
    m(x)
    # deviation from the OLD estimate 1: mean((x - 1)^2) = [2, 5]
    torch.testing.assert_close(m.running_mean, torch.tensor([1.5, 1.5], dtype=F64))
    torch.testing.assert_close(m.running_var, torch.tensor([2.5, 4.75], dtype=F64))
    assert int(m.num_batches_tracked) == 2


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_estimate_mode_matches_the_reference_with_stop_gradient_statistics(mode: str, dtype: torch.dtype) -> None:
    m = _randomised(BatchChannelNorm(6, num_groups=3, estimate=True, moving_speed=0.3, dtype=dtype)).train(
        mode == "train")
    x = (torch.randn(2, 6, 4, 3, dtype=F64) * 1.5 + 0.5).to(dtype).requires_grad_(True)
    fresh = copy.deepcopy(m)
    expected = reference(fresh, x.detach().double())
    mean, var = estimated_stats(fresh, x.detach().double())
    y = m(x)
    tol = 1e-10 if dtype == F64 else 1e-5
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(m.running_mean.double(), mean if mode == "train" else fresh.running_mean.double())
    # The statistics are constants for autograd: the gradient is that of the reference with them held fixed.
    x64 = x.detach().double().requires_grad_(True)
    held = copy.deepcopy(fresh).double().eval()
    with torch.no_grad():
        held.running_mean.copy_(mean)
        held.running_var.copy_(var)
    g = torch.randn_like(expected)
    (reference(held, x64) * g).sum().backward()
    (y * g.to(dtype)).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)  # type: ignore[union-attr]
    # The functional op with the module's attributes: the same output.
    twin = copy.deepcopy(fresh)
    got = batch_channel_norm(x.detach(), 6, 3, twin.running_mean, twin.running_var, twin.weight, twin.bias,
                             twin.group_weight, twin.group_bias, training=twin.training, eps=twin.eps,
                             num_batches_tracked=twin.num_batches_tracked, estimate=True, moving_speed=0.3)
    torch.testing.assert_close(got, y.detach(), rtol=0, atol=0)
    cl = copy.deepcopy(fresh)(x.detach().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, y.detach(), rtol=0, atol=1e-6)


def test_micro_batch_of_one_pixel_and_one_image() -> None:
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel when training"):
        BatchChannelNorm(4)(x)
    assert BatchChannelNorm(4, estimate=True)(torch.randn(1, 4, 3, 3)).shape == (1, 4, 3, 3)


def test_group_count_and_errors() -> None:
    assert BatchChannelNorm(64).num_groups == 32 and BatchChannelNorm(48).num_groups == 24
    with pytest.raises(ValueError, match=r"expected num_groups to be a positive divisor of num_features=6, got "
                                         r"num_groups=4"):
        BatchChannelNorm(6, num_groups=4)
    with pytest.raises(ValueError, match=r"expected moving_speed in \[0, 1\], got 1.5"):
        BatchChannelNorm(6, estimate=True, moving_speed=1.5)


@pytest.mark.parametrize("estimate", [False, True])
def test_recalibration_writes_plain_batch_statistics_and_fold_is_refused(estimate: bool) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), BatchChannelNorm(4, num_groups=2, estimate=estimate))
    x = torch.randn(16, 3, 5, 5)
    recalibrate_stats(net, [x])
    with torch.no_grad():
        h = net[0](x)
    torch.testing.assert_close(net[1].running_mean, h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, h.var((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert net[1].estimate is estimate  # the override is undone
    report = fold_norms(net.eval(), strict=False)
    assert not report.folded and len(report.refused) == 1
