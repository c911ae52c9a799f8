"""Tests of normlab/diagnostics/representation.py: D1 angular distance, D4 variance/RMS/update ratio and D5 massive
activations against direct float64 computations, on hand-made tensors and toy models with known geometry."""

from __future__ import annotations

import pytest
import torch

from normlab.diagnostics import RepresentationStats, angular_distance, collect
from tests.diagnostics._toy import Rotate, Scale, ToyModel, TupleBlock


def _by(rows, metric, variant=None, gap=None):
    return {
        r["layer"]: r["value"]
        for r in rows
        if r["metric"] == metric and r.get("variant") == variant and (gap is None or r.get("gap") == gap)
    }


def test_angular_distance_known_angles() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0], [1.0, 0.0]])
    d = angular_distance(a, b)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d, torch.tensor([0.5, 0.0, 1.0, 0.5], dtype=torch.float64), atol=1e-7, rtol=0)


def test_stats_match_direct_computation_with_padding() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 5, 6)
    y = torch.randn(3, 5, 6) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()  # right, left, none
    stats = RepresentationStats()
    stats.update([x], [y], mask)
    rows = stats.rows()
    d = angular_distance(x, y)
    assert _by(rows, "angular_distance", "all_tokens")[1] == pytest.approx(float(d[mask].mean()), rel=1e-12)
    last = torch.tensor([2, 4, 4])
    assert _by(rows, "angular_distance", "last_token")[1] == pytest.approx(float(d[torch.arange(3), last].mean()))
    valid_y = y.double()[mask]
    assert _by(rows, "hidden_variance", "all_elements")[1] == pytest.approx(float(valid_y.var(unbiased=False)))
    per_tok = valid_y.var(-1, unbiased=False).mean()
    assert _by(rows, "hidden_variance", "per_token")[1] == pytest.approx(float(per_tok))
    assert _by(rows, "hidden_rms")[0] == pytest.approx(float(x.double()[mask].square().mean().sqrt()))
    ratio = ((y - x).double().norm(dim=-1) / x.double().norm(dim=-1))[mask].mean()
    assert _by(rows, "update_ratio")[1] == pytest.approx(float(ratio))
    assert _by(rows, "max_abs")[1] == pytest.approx(float(valid_y.abs().max()))
    # Padding content must not matter.
    y2 = y.clone()
    y2[~mask] = 1e6
    stats2 = RepresentationStats()
    stats2.update([x], [y2], mask)
    assert [r["value"] for r in stats2.rows()] == pytest.approx([r["value"] for r in rows])


def test_massive_activation_found_per_sequence() -> None:
    h = torch.full((2, 4, 8), 0.5)
    h[0, 1, 3] = -300.0  # a massive activation in sequence 0
    h[1, 2, 5] = 40.0
    h[1, 3, 0] = 1e5  # padding: must be ignored
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    stats = RepresentationStats(["massive_activations", "max_abs"], top_k=2)
    stats.update([h], [h], mask)
    rows = stats.rows()
    assert _by(rows, "massive_activations", "top1")[1] == pytest.approx((300 + 40) / 2)
    assert _by(rows, "massive_activations", "top2")[1] == pytest.approx(0.5)
    assert _by(rows, "massive_activations", "median")[1] == pytest.approx(0.5)
    assert _by(rows, "massive_activations", "top1_to_median")[1] == pytest.approx((600 + 80) / 2)
    assert _by(rows, "max_abs")[1] == pytest.approx(300.0)


def test_pooling_over_batches_equals_one_big_batch() -> None:
    torch.manual_seed(2)
    x, y = torch.randn(4, 3, 5), torch.randn(4, 3, 5) + 2.0
    mask = torch.ones(4, 3, dtype=torch.bool)
    whole = RepresentationStats()
    whole.update([x], [y], mask)
    parts = RepresentationStats()
    parts.update([x[:1]], [y[:1]], mask[:1])
    parts.update([x[1:]], [y[1:]], mask[1:])
    a, b = whole.rows(), parts.rows()
    assert [(r["metric"], r["layer"], r.get("variant")) for r in a] == [(r["metric"], r["layer"], r.get("variant"))
                                                                       for r in b]
    assert [r["value"] for r in a] == pytest.approx([r["value"] for r in b], rel=1e-10)


@pytest.mark.parametrize("tuple_out", [False, True])
def test_toy_model_geometry_through_hooks(tuple_out: bool) -> None:
    blocks = [Rotate(), Scale(2.0), Scale(-1.0)]
    model = ToyModel([TupleBlock(b) for b in blocks] if tuple_out else blocks, tuple_out=tuple_out)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    rows = collect(model, {"input_ids": ids, "attention_mask": ids != 0}, ["angular_distance", "hidden_rms"],
                   max_gap=2)
    d1 = _by(rows, "angular_distance", "all_tokens", gap=1)
    assert d1 == pytest.approx({1: 0.5, 2: 0.0, 3: 1.0}, abs=1e-7)
    d2 = _by(rows, "angular_distance", "last_token", gap=2)
    assert d2 == pytest.approx({1: 0.5, 2: 1.0}, abs=1e-7)  # x1 vs x3 (rotated), x2 vs x4 (negated)
    rms = _by(rows, "hidden_rms")
    assert rms[2] == pytest.approx(2 * rms[1]) and rms[3] == pytest.approx(rms[2])
    assert sorted(rms) == [0, 1, 2, 3]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown metrics"):
        RepresentationStats(["variance"])
    with pytest.raises(ValueError, match="max_gap to be an int >= 1, got 0"):
        RepresentationStats(max_gap=0)
    with pytest.raises(ValueError, match=r"expected hidden states of size \[B, N, d\]"):
        RepresentationStats().update([torch.zeros(2, 3, 4)], [torch.zeros(2, 3, 4)], torch.ones(2, 4).bool())
    assert RepresentationStats().rows() == []
