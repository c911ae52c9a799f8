"""Tests of normlab/diagnostics/batch_stats.py: the batch-vs-running deviation of BatchNorm, PowerNorm, UnifiedNorm
and PRepBatchNorm against hand computations over valid tokens, step counting, selection by the registry trait, and
``collect`` leaving buffers and modes unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.diagnostics import BatchStatMonitor, collect
from normlab.functional.power_norm import group_scaling
from normlab.models import DecoderLM, TransformerConfig
from normlab.nn import BatchNorm, LayerNorm, PowerNorm, PRepBatchNorm, UnifiedNorm


class _Wrap(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(x, mask=mask)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(4)
    x = torch.randn(2, 5, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + torch.tensor([0.0, 1.0, -2.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]).bool()
    x[~mask] = 50.0  # padding content must not count
    return x, mask


def _rows(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    with BatchStatMonitor(model) as mon:
        model(x, mask)
    return {r["variant"]: r["value"] for r in mon.rows()}


def test_batch_norm_deviation_against_hand_computation() -> None:
    x, mask = _data()
    bn = BatchNorm(4, channel_dim=-1)
    run_mean, run_var = torch.tensor([0.1, 0.9, -1.5, 0.0]), torch.tensor([1.0, 3.0, 0.2, 8.0])
    with torch.no_grad():
        bn.running_mean.copy_(run_mean)
        bn.running_var.copy_(run_var)
    got = _rows(_Wrap(bn).train(), x, mask)
    valid = x.double()[mask]
    mean, var = valid.mean(0), valid.var(0, unbiased=True)
    rm, rv = run_mean.double(), run_var.double()
    assert got["var"] == pytest.approx(float((var / rv - 1).abs().mean()), rel=1e-9)
    assert got["mean"] == pytest.approx(float(((mean - rm).abs() / (rv + bn.eps).sqrt()).mean()), rel=1e-9)


def test_power_norm_uses_group_scaled_quadratic_mean() -> None:
    x, mask = _data()
    pn = PowerNorm(4, group_num=2)
    phi = torch.tensor([0.5, 1.5, 1.0, 2.0])
    with torch.no_grad():
        pn.running_phi.copy_(phi)
    got = _rows(_Wrap(pn).train(), x, mask)
    psi2 = group_scaling(x.double(), 2)[mask].square().mean(0)
    assert set(got) == {"var"}
    assert got["var"] == pytest.approx(float((psi2 / phi.double() - 1).abs().mean()), rel=1e-6)


def test_unified_norm_uses_quadratic_mean() -> None:
    x, mask = _data()
    un = UnifiedNorm(4)
    got = _rows(_Wrap(un).train(), x, mask)  # running_var starts at 1
    x2 = x.double()[mask].square().mean(0)
    assert set(got) == {"var"}
    assert got["var"] == pytest.approx(float((x2 - 1).abs().mean()), rel=1e-9)


def test_prep_batch_norm_measured_once_through_its_repbn() -> None:
    model = nn.Sequential()
    model.add_module("n", PRepBatchNorm(4, total_steps=3))
    assert [name for name, _, _ in BatchStatMonitor(model).modules] == ["n"]
    x, mask = _data()
    got = _rows(_Wrap(model.n).train(), x, mask)
    valid = x.double()[mask]
    assert got["var"] == pytest.approx(float((valid.var(0) - 1).abs().mean()), rel=1e-9)


def test_steps_eval_mode_and_trait_selection() -> None:
    x, mask = _data()
    model = _Wrap(BatchNorm(4, channel_dim=-1)).train()
    with BatchStatMonitor(model) as mon:
        for _ in range(3):
            model(x, mask)
        model.eval()
        model(x, mask)
    steps = [r["step"] for r in mon.rows() if r["variant"] == "var"]
    assert steps == [0, 1, 2]
    values = [r["value"] for r in mon.rows() if r["variant"] == "var"]
    assert values[1] < values[0]  # the running variance moves toward the batch variance
    assert BatchStatMonitor(_Wrap(LayerNorm(4))).modules == []
    untracked = BatchStatMonitor(_Wrap(BatchNorm(4, channel_dim=-1, track_running_stats=False)))
    assert untracked.modules == []


def test_collect_in_a_model_restores_buffers_and_modes() -> None:
    model = DecoderLM(TransformerConfig(d_model=16, n_layers=2, n_heads=2, norm="batch_norm", max_seq_len=8))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[2, 4:] = 0
    rows = collect(model, [{"input_ids": ids, "attention_mask": mask}] * 2, ["batch_stat_deviation"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    names = {r["module"] for r in rows}
    assert names == {"blocks.0.attn_in_norm", "blocks.0.mlp_in_norm", "blocks.1.attn_in_norm", "blocks.1.mlp_in_norm",
                     "final_norm"}
    assert {r["layer"] for r in rows if r["module"].startswith("blocks.1")} == {2}
    assert {r["layer"] for r in rows if r["module"] == "final_norm"} == {None}
    assert {r["step"] for r in rows} == {0, 1}
    # Within one collect the second batch sees the running stats updated by the first (restored only at the end).
    first = [r["value"] for r in rows if r["module"] == "final_norm" and r["variant"] == "var"]
    assert first[1] < first[0]


def test_monitor_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="expected model to be a torch.nn.Module, got int"):
        BatchStatMonitor(3)  # type: ignore[arg-type]
