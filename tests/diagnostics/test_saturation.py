"""Saturation of bounded-nonlinearity norms: DyT declares it, the monitor counts it per norm, models without such a
norm record nothing, and the hooks and modes are restored."""

from __future__ import annotations

import torch
from torch import nn

from normlab.diagnostics import SaturationMonitor, saturating_norms, saturation_rows
from normlab.models import DecoderLM
from normlab.models.config import TransformerConfig
from normlab.nn import DyT


def test_dyt_declares_where_tanh_saturates() -> None:
    norm = DyT(4, alpha_init=0.5)
    x = torch.tensor([[-5.0, -3.9, 4.1, 0.0]])  # |0.5 x| = 2.5, 1.95, 2.05, 0
    assert norm.saturation(x).tolist() == [[True, False, True, False]]
    assert saturating_norms(nn.LayerNorm(4)) == [] and [n for n, _ in saturating_norms(norm)] == [""]


def test_monitor_counts_per_norm_over_forwards_and_removes_its_hooks() -> None:
    model = nn.Sequential(nn.Linear(4, 4), DyT(4, alpha_init=1.0), nn.Linear(4, 4), DyT(4, alpha_init=1.0))
    with torch.no_grad():
        model[0].weight.copy_(10 * torch.eye(4))
        model[0].bias.zero_()
        model[2].weight.zero_()
        model[2].bias.zero_()
    x = torch.tensor([[1.0, 0.1, -1.0, 0.0], [0.3, 0.0, 0.0, 0.0]])  # 10x: 3 of 8 elements beyond |2|
    with SaturationMonitor(model) as monitor:
        model(x)
        model(x)
    assert monitor.counts() == {"1": (6, 16), "3": (0, 16)}
    assert monitor.fractions() == {"1": 0.375, "3": 0.0}
    assert [r["module"] for r in monitor.rows()] == ["1", "3"] and monitor.rows()[0]["count"] == 16
    assert all(not m._forward_pre_hooks for m in model)
    model(x)
    assert monitor.counts()["1"] == (6, 16)  # nothing counted after exit


def test_saturation_rows_on_a_decoder_restores_modes() -> None:
    torch.manual_seed(0)
    model = DecoderLM(TransformerConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=8, norm="dyt")).train()
    rows = saturation_rows(model, {"input_ids": torch.randint(0, 256, (2, 8))})
    names = [r["module"] for r in rows]
    assert names[-1] == "final_norm" and len(names) == 5  # two per block and the final norm
    assert all(r["value"] == 0.0 for r in rows)  # embeddings at std 0.02: nothing saturates at init
    assert model.training and all(m.training for m in model.modules())
    with torch.no_grad():
        model.embed.weight.mul_(1e4)
    assert saturation_rows(model, [torch.randint(0, 256, (2, 8))])[0]["value"] > 0.9
    ln = DecoderLM(TransformerConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=8))
    assert saturation_rows(ln, torch.randint(0, 256, (2, 8))) == []
