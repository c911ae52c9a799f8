"""recalibrate_stats (SLAB's freeze-everything, re-estimate-the-statistics step): the running statistics after a pass
over data from a shifted distribution equal the hand-computed cumulative average / EMA of the batch statistics, and
nothing else moves (parameters, requires_grad, train/eval flags, PRepBN's schedule, PN/UN step counters and windows).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from normlab.functional.power_norm import group_scaling
from normlab.nn import BatchNorm, PowerNorm, PRepBatchNorm, RepBatchNorm, UnifiedNorm
from normlab.registry import create_norm
from normlab.surgery import recalibrate_stats

D = torch.float64
C = 6
KINDS = ["batch_norm", "rep_batch_norm", "prep_batch_norm", "power_norm", "unified_norm"]
KWARGS: dict[str, dict[str, Any]] = {
    "batch_norm": {"channel_dim": -1},
    "prep_batch_norm": {"total_steps": 10},
    "power_norm": {"group_num": 2, "warmup_iters": 3},
    "unified_norm": {"window_size": 2, "warmup_iters": 2, "outlier_filtration": True},
}


class Net(nn.Module):
    """``norm(drop(lin(x)), mask)``: the dropout must be off during the pass, the mask must reach the norm."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(C, C, dtype=D)
        self.drop = nn.Dropout(0.5)
        self.norm = create_norm(kind, C, dtype=D, **KWARGS.get(kind, {}))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.norm(self.drop(self.lin(x)), mask=mask)


def _trained(kind: str, seed: int = 0) -> Net:
    """A few training steps on N(0, 1) data, so counters, windows and the PRepBN ramp are mid-way."""
    torch.manual_seed(seed)
    net = Net(kind).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(4):
        opt.zero_grad()
        net(torch.randn(3, 5, C, dtype=D)).square().mean().backward()
        opt.step()
    return net


def _shifted(n: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    """Batches from another distribution (scale 3, offset 2) with ragged padding masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(3, 5, C, generator=g, dtype=D) * 3.0 + 2.0
        mask = torch.ones(3, 5, dtype=torch.bool)
        mask[i % 3, 2 + i % 3 :] = False
        out.append((x, mask))
    return out


def _batch_stats(kind: str, net: Net, x: Tensor, mask: Tensor) -> list[Tensor]:
    """The batch statistic(s) of the norm's input over valid tokens, written out by hand."""
    with torch.no_grad():
        h = net.lin(x)[mask]
    if kind == "power_norm":
        return [group_scaling(h, 2).square().mean(0)]
    if kind == "unified_norm":
        return [h.square().mean(0)]
    return [h.mean(0), h.var(0, unbiased=True)]


def _stat_buffers(kind: str, norm: nn.Module) -> list[Tensor]:
    if kind == "power_norm":
        return [norm.running_phi]
    if kind == "unified_norm":
        return [norm.running_var]
    bn = norm.norm2 if kind == "prep_batch_norm" else norm
    return [bn.running_mean, bn.running_var]


def _other_state(net: nn.Module, kind: str) -> dict[str, Tensor]:
    """Every parameter and every buffer that is not a recalibrated statistic."""
    stats = {"running_mean", "running_var", "running_phi", "num_batches_tracked"}
    return {k: v.clone() for k, v in net.state_dict().items() if k.rsplit(".", 1)[-1] not in stats}


@pytest.mark.parametrize("kind", KINDS)
def test_cumulative_average_of_shifted_batches_and_nothing_else_moves(kind: str) -> None:
    net = _trained(kind)
    net.lin.bias.requires_grad_(False)
    net.norm.eval()  # mixed modes: the model in train mode, its norm in eval mode
    modes = {name: m.training for name, m in net.named_modules()}
    before = _other_state(net, kind)
    batches = _shifted(5)
    x_eval, _ = _shifted(1, seed=7)[0]
    net.eval()
    y_before = net(x_eval)
    net.train()
    net.norm.eval()

    report = recalibrate_stats(net, batches)

    assert report.recalibrated == ["norm"] and report.calls == {"norm": 5} and report.num_batches == 5
    expected = [torch.stack(s).mean(0) for s in zip(*(_batch_stats(kind, net, x, m) for x, m in batches), strict=True)]
    for got, want in zip(_stat_buffers(kind, net.norm), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    after = _other_state(net, kind)
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert [p.requires_grad for p in net.parameters()] == [True, False] + [True] * (len(list(net.parameters())) - 2)

    # Eval output: that of a norm holding the hand-computed statistics, and not what it was.
    ref = copy.deepcopy(net).eval()
    with torch.no_grad():
        for buf, want in zip(_stat_buffers(kind, ref.norm), expected, strict=True):
            buf.copy_(want)
    net.eval()
    y_after = net(x_eval)
    torch.testing.assert_close(y_after, ref(x_eval), rtol=1e-10, atol=1e-10)
    assert (y_after - y_before).abs().max() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_ema_without_reset_blends_into_existing_statistics(kind: str) -> None:
    net = _trained(kind).eval()
    start = [b.clone() for b in _stat_buffers(kind, net.norm)]
    batches = _shifted(3, seed=4)
    report = recalibrate_stats(net, batches, reset=False, momentum=0.25)
    assert report.momentum == 0.25 and not report.reset
    want = start
    for x, m in batches:
        want = [0.75 * w + 0.25 * s for w, s in zip(want, _batch_stats(kind, net, x, m), strict=True)]
    for got, w in zip(_stat_buffers(kind, net.norm), want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)


def test_ema_with_reset_starts_from_initial_statistics_and_counts_batches() -> None:
    net = _trained("batch_norm").eval()
    batches = _shifted(2, seed=5)
    recalibrate_stats(net, batches, momentum=0.5)
    s1, s2 = (_batch_stats("batch_norm", net, x, m) for x, m in batches)
    torch.testing.assert_close(net.norm.running_mean, 0.25 * 0.0 + 0.25 * s1[0] + 0.5 * s2[0])
    torch.testing.assert_close(net.norm.running_var, 0.25 * 1.0 + 0.25 * s1[1] + 0.5 * s2[1])
    assert int(net.norm.num_batches_tracked) == 2


def test_prep_batch_norm_mid_ramp_keeps_its_schedule_and_runs_the_eval_branch() -> None:
    net = _trained("prep_batch_norm")
    norm = net.norm
    assert isinstance(norm, PRepBatchNorm)
    lam, sched = norm.current_lambda(), [int(norm.warm), int(norm.iter), int(norm.num_step)]
    assert 0.0 < lam < 1.0  # mid-ramp
    seen: list[Tensor] = []
    net.lin.register_forward_hook(lambda m, a, out: seen.append(out))
    outs: list[Tensor] = []
    norm.register_forward_hook(lambda m, a, out: outs.append(out))
    x, mask = _shifted(1)[0]
    recalibrate_stats(net, [(x, mask)])
    assert [int(norm.warm), int(norm.iter), int(norm.num_step)] == sched and norm.current_lambda() == lam
    # The pass output is RepBN with batch statistics (lambda = 0), not the LayerNorm mix of training.
    h = seen[0]
    valid = h[mask]
    rep = (h - valid.mean(0)) / torch.sqrt(valid.var(0, unbiased=False) + norm.norm2.eps)
    rep = rep * norm.norm2.weight + norm.norm2.bias + norm.norm2.alpha * h
    torch.testing.assert_close(outs[0], rep)


def test_power_and_unified_norm_counters_do_not_move() -> None:
    for kind in ("power_norm", "unified_norm"):
        net = _trained(kind)
        norm = net.norm
        assert isinstance(norm, (PowerNorm, UnifiedNorm))
        iters, warm = int(norm.iters), norm.warmup_iters
        recalibrate_stats(net, _shifted(3))
        assert int(norm.iters) == iters == 4 and norm.warmup_iters == warm
        if isinstance(norm, PowerNorm):
            assert norm.alpha_fwd == 0.9
        else:
            assert norm.momentum == 0.9 and norm.outlier_filtration is True


def test_torch_batch_norm_dropout_off_and_model_is_a_norm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Dropout(0.9), nn.BatchNorm1d(4, momentum=None)).train()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(32, 4, 7, generator=g) * 2.0 - 1.0 for _ in range(3)]
    recalibrate_stats(net, batches)
    flat = [b.transpose(1, 2).reshape(-1, 4) for b in batches]
    torch.testing.assert_close(net[1].running_mean, torch.stack([f.mean(0) for f in flat]).mean(0))
    torch.testing.assert_close(net[1].running_var, torch.stack([f.var(0) for f in flat]).mean(0))
    assert net[1].momentum is None and net.training and net[0].training and net[1].training
    assert int(net[1].num_batches_tracked) == 3

    bn = nn.SyncBatchNorm(4).eval()
    report = recalibrate_stats(bn, [b.unsqueeze(-1) for b in batches])  # (N, C, L, 1): SyncBN wants >= 3-D
    assert report.recalibrated == ["<model>"] and not bn.training
    torch.testing.assert_close(bn.running_mean, net[1].running_mean)

    prep = PRepBatchNorm(C, total_steps=5).eval()  # the model itself is a PRepBN: its norm2 is not a second target
    assert recalibrate_stats(prep, [torch.randn(2, 5, C)]).recalibrated == ["<model>"]


def test_model_with_several_norms_and_a_norm_without_running_stats() -> None:
    net = nn.Sequential(
        nn.Linear(4, 4), BatchNorm(4, channel_dim=-1, track_running_stats=False), nn.Linear(4, 4),
        RepBatchNorm(4), nn.BatchNorm1d(4, track_running_stats=False),
    ).eval()
    report = recalibrate_stats(net, [torch.randn(8, 4) for _ in range(2)], max_batches=1)
    assert report.recalibrated == ["3"] and report.num_batches == 1
    assert [p for p, _ in report.skipped] == ["1", "4"] and "track_running_stats=False" in report.skipped[0][1]
    assert "1 norm(s) over 1 batch(es)" in str(report)


def test_custom_forward_and_mapping_batches() -> None:
    net = Net("batch_norm").eval()
    batches = _shifted(2)
    calls = []

    def fwd(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        calls.append(1)
        return model(batch["x"], mask=batch["mask"])

    recalibrate_stats(net, [{"x": x, "mask": m} for x, m in batches], forward=fwd)
    other = Net("batch_norm").eval()
    other.load_state_dict(net.state_dict())
    recalibrate_stats(other, [{"x": x, "mask": m} for x, m in batches])  # default: model(**batch)
    assert len(calls) == 2
    torch.testing.assert_close(other.norm.running_var, net.norm.running_var)


def test_bad_arguments_raise_and_leave_the_model_unchanged() -> None:
    net = _trained("unified_norm").eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    batches = _shifted(2)
    with pytest.raises(ValueError, match=r"momentum=None .* needs reset=True, got reset=False"):
        recalibrate_stats(net, batches, reset=False)
    with pytest.raises(ValueError, match=r"expected momentum in \(0, 1\] or None, got 0.0"):
        recalibrate_stats(net, batches, momentum=0.0)
    with pytest.raises(TypeError, match=r"expected momentum to be a float or None, got str"):
        recalibrate_stats(net, batches, momentum="0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected reset to be a bool, got int"):
        recalibrate_stats(net, batches, reset=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected max_batches to be an int >= 1 or None, got 0"):
        recalibrate_stats(net, batches, max_batches=0)
    with pytest.raises(TypeError, match=r"expected batches to be an iterable of batches .* got Tensor"):
        recalibrate_stats(net, torch.randn(3, 5, C, dtype=D))
    with pytest.raises(TypeError, match=r"expected model to be an nn.Module, got str"):
        recalibrate_stats("net", batches)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Sequential has no batch-statistic norm with running statistics"):
        recalibrate_stats(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), [torch.randn(2, 2)])
    with pytest.raises(ValueError, match=r"expected at least one batch, got an empty batches iterable"):
        recalibrate_stats(net, [])
    with pytest.raises(TypeError, match=r"expected each batch to be a Tensor, a tuple/list .* got int"):
        recalibrate_stats(net, [3])
    with pytest.raises(ValueError, match=r"expected mask of size \[3, 5\]"):  # fails mid-pass, after a good batch
        recalibrate_stats(net, [batches[0], (batches[1][0], torch.ones(2, 2, dtype=torch.bool))])
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)
    assert not net.training and net.norm.momentum == 0.9


class _SpareNorm(nn.Module):
    """A trained ``net`` whose norm the forward never calls (only ``net.lin``), and a BatchNorm1d it does call."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = _trained(kind)
        self.bn = nn.BatchNorm1d(C, dtype=D)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.bn(self.net.lin(x).reshape(-1, C))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("momentum", [None, 0.5])
def test_norm_not_called_by_the_forward_keeps_its_statistics_and_is_skipped(kind: str, momentum: float | None) -> None:
    model = _SpareNorm(kind).eval()
    spare = {k: v.clone() for k, v in model.net.norm.state_dict().items()}
    assert any((v - {"running_var": 1.0, "running_phi": 1.0}.get(k, 0.0)).abs().max() > 0.1  # trained, not initial
               for k, v in spare.items() if k.rsplit(".", 1)[-1] in {"running_mean", "running_var", "running_phi"})

    report = recalibrate_stats(model, _shifted(3), momentum=momentum)

    assert report.recalibrated == ["bn"] and report.calls == {"bn": 3}
    assert [p for p, _ in report.skipped] == ["net.norm"]
    assert "not called by the forward during the pass" in report.skipped[0][1]
    assert "skipped net.norm: not called by the forward" in str(report)
    for k, v in model.net.norm.state_dict().items():
        torch.testing.assert_close(v, spare[k], rtol=0, atol=0, msg=k)
    assert int(model.bn.num_batches_tracked) == 3 and model.bn.running_mean.abs().max() > 0.5


def test_unused_torch_batch_norm_keeps_trained_statistics_and_skips_keep_module_order() -> None:
    torch.manual_seed(0)
    net = nn.ModuleDict({
        "off": nn.BatchNorm1d(4, track_running_stats=False), "unused": nn.BatchNorm1d(4), "used": nn.BatchNorm1d(4),
    })
    net["unused"].train()(torch.randn(64, 4) * 2.0 + 4.5)  # trained statistics near mean 4.5 / variance 4
    net["unused"].train()(torch.randn(64, 4) * 2.0 + 4.5)
    mean, var = net["unused"].running_mean.clone(), net["unused"].running_var.clone()
    assert int(net["unused"].num_batches_tracked) == 2 and mean.min() > 0.5

    report = recalibrate_stats(net, [torch.randn(8, 4) for _ in range(2)], forward=lambda m, x: m["used"](x))

    assert report.recalibrated == ["used"] and report.calls == {"used": 2}
    assert [p for p, _ in report.skipped] == ["off", "unused"]
    torch.testing.assert_close(net["unused"].running_mean, mean, rtol=0, atol=0)
    torch.testing.assert_close(net["unused"].running_var, var, rtol=0, atol=0)
    assert int(net["unused"].num_batches_tracked) == 2

    # No norm called at all: nothing recalibrated, every statistic as it was.
    report = recalibrate_stats(net, [torch.randn(8, 4)], forward=lambda m, x: None)
    assert report.recalibrated == [] and report.calls == {} and report.num_batches == 1
    assert [p for p, _ in report.skipped] == ["off", "unused", "used"]
    torch.testing.assert_close(net["unused"].running_mean, mean, rtol=0, atol=0)
    assert int(net["used"].num_batches_tracked) == 2


def test_bad_forward_and_max_batches_types_and_values() -> None:
    net = _trained("batch_norm").eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    batches = _shifted(2)
    with pytest.raises(TypeError, match=r"expected forward to be callable or None, got str"):
        recalibrate_stats(net, batches, forward="model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected max_batches to be an int or None, got str"):
        recalibrate_stats(net, batches, max_batches="3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected max_batches to be an int or None, got float"):
        recalibrate_stats(net, batches, max_batches=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected max_batches to be an int or None, got bool"):
        recalibrate_stats(net, batches, max_batches=True)
    with pytest.raises(ValueError, match=r"expected max_batches to be an int >= 1 or None, got -2"):
        recalibrate_stats(net, batches, max_batches=-2)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)


def test_registered_batch_statistic_norm_without_a_rule_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    # Reachable through the public API: a user registers their own norm with the traits recalibration selects on.
    from normlab import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the registration does not outlive the test
    monkeypatch.setattr(registry, "_NAME_INDEX", dict(registry._NAME_INDEX))

    @registry.register_norm(
        "recal_test_norm", functional=None, reference=None, layout="token", has_running_stats=True,
        batch_dependent=True,
    )
    class RecalTestNorm(nn.BatchNorm1d):
        pass

    net = nn.Sequential(nn.Linear(4, 4), RecalTestNorm(4)).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TypeError, match=r"norm 1 \(RecalTestNorm, registered as 'recal_test_norm'\) has running "
                                        r"statistics but no recalibration rule"):
        recalibrate_stats(net, [torch.randn(8, 4)])
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)
