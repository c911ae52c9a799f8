"""EvoNorm-B0 / S0 (https://arxiv.org/abs/2004.02967): the spec's hand-checked vectors, the TF vs timm running
variance, group-count rules and the protocol (recalibration, monitoring, fold refusal)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.diagnostics import BatchStatMonitor
from normlab.nn import EvoNormB0, EvoNormS0
from normlab.surgery import fold_norms, recalibrate_stats
from normlab.testing.reference_evo_norm import evo_norm_b0_running_var

F64 = torch.float64


def _close(got: torch.Tensor, expected: list[float], atol: float = 1e-4) -> None:
    torch.testing.assert_close(got.detach().flatten(), torch.tensor(expected, dtype=F64), rtol=0, atol=atol)


def test_s0_spec_vector() -> None:
    x = torch.tensor([[[[1.0, -1.0]], [[2.0, 0.0]]]], dtype=F64)  # N=1, C=2, H=1, W=2
    _close(EvoNormS0(2, num_groups=1, dtype=F64)(x), [0.6539, -0.2405, 1.5756, 0.0])


def test_b0_spec_vector_and_running_variance_tf_and_timm() -> None:
    x = torch.tensor([[[[1.0, 3.0]]], [[[-1.0, 1.0]]]], dtype=F64)  # N=2, C=1, H=1, W=2
    tf = EvoNormB0(1, dtype=F64)
    _close(tf(x), [0.5, 0.75, -0.70711, 0.5])
    _close(tf.running_var, [1.1], atol=1e-12)
    timm = EvoNormB0(1, bessel=True, dtype=F64)
    timm(x)
    _close(timm.running_var, [0.9 + 0.1 * 2 * 4 / 3], atol=1e-12)
    torch.testing.assert_close(timm.running_var, evo_norm_b0_running_var(EvoNormB0(1, bessel=True), x))


def test_b0_eval_uses_running_variance_and_the_current_sample_only() -> None:
    m = EvoNormB0(3, dtype=F64).eval()
    m.running_var.fill_(4.0)
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    alone = torch.cat([m(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(m(x), alone, rtol=0, atol=0)  # eval is per-sample
    # With v = 0 the instance branch is sqrt(t² + eps) and max() picks the larger std.
    with torch.no_grad():
        m.v.zero_()
    t = x.var((2, 3), unbiased=False, keepdim=True)
    expected = x / torch.maximum(torch.full_like(t, (4.0 + 1e-5) ** 0.5), (t + 1e-5).sqrt())
    torch.testing.assert_close(m(x), expected)


def test_s0_group_count_defaults_to_the_largest_divisor_up_to_32() -> None:
    assert EvoNormS0(64).num_groups == 32
    assert EvoNormS0(48).num_groups == 24  # TF's fallback; timm refuses 48 channels with 32 groups
    assert EvoNormS0(7).num_groups == 7
    with pytest.raises(ValueError, match=r"expected num_groups to be a positive divisor of num_features=6, got "
                                         r"num_groups=4"):
        EvoNormS0(6, num_groups=4)


def test_s0_is_batch_independent() -> None:
    m = EvoNormS0(8, num_groups=2)
    x = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(m(x)[1:2], m(x[1:2]), rtol=0, atol=0)


def test_neither_folds_and_the_report_says_why() -> None:
    for norm in (EvoNormB0(4), EvoNormS0(4, num_groups=2)):
        net = nn.Sequential(nn.Conv2d(3, 4, 3), norm).eval()
        report = fold_norms(net, strict=False)
        assert not report.folded and len(report.refused) == 1
        with pytest.raises(TypeError, match="is not foldable"):
            norm.folded_affine()


def test_b0_recalibration_writes_the_batch_variance() -> None:
    net = nn.Sequential(nn.Conv2d(2, 3, 1), EvoNormB0(3))
    x = torch.randn(8, 2, 5, 5)
    recalibrate_stats(net, [x])
    with torch.no_grad():
        h = net[0](x)
    torch.testing.assert_close(net[1].running_var, h.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)


def test_b0_monitor_compares_running_and_batch_variance() -> None:
    net = nn.Sequential(EvoNormB0(3))
    x = torch.randn(64, 3, 6, 6) * 2.0 + 5.0  # a mean far from 0: the monitor must centre the input
    net[0].running_var.copy_(x.var((0, 2, 3), unbiased=False))
    with BatchStatMonitor(net) as monitor:
        net(x)
    rows = [r for r in monitor.rows() if r["variant"] == "var"]
    assert len(rows) == 1 and rows[0]["value"] < 1e-4
