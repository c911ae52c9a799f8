"""Tests of normlab/diagnostics/collect.py, _capture.py and plot.py: the single entry point's modes and side effects,
layer discovery, the hidden-states fallback, padding invariance on the decoder, argument errors and the plot."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from normlab.diagnostics import DEFAULT_METRICS, METRICS, collect, find_layers, per_layer_series, plot_per_layer
from normlab.models import DecoderLM, TransformerConfig
from tests._extras import require
from tests.diagnostics._toy import Rotate, Scale


def _decoder(**kw: Any) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(TransformerConfig(d_model=16, n_layers=3, n_heads=2, max_seq_len=8, **kw))


def test_find_layers() -> None:
    model = _decoder()
    assert find_layers(model) == list(model.blocks)
    assert find_layers(model, "blocks") == list(model.blocks)
    two = [model.blocks[0], model.blocks[2]]
    assert find_layers(model, two) == two
    with pytest.raises(ValueError, match=r"layers='encoder.layer' must name a non-empty ModuleList"):
        find_layers(model, "encoder.layer")
    with pytest.raises(ValueError, match="could not find the block list of Sequential"):
        find_layers(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="expected layers to be a sequence of modules, got Linear"):
        find_layers(model, nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected model to be a torch.nn.Module, got str"):
        find_layers("model")  # type: ignore[arg-type]


def test_collect_restores_modes_and_grads() -> None:
    model = _decoder(dropout=0.1).train()
    ids = torch.randint(0, 256, (2, 8))
    rows = collect(model, {"input_ids": ids, "labels": ids}, METRICS)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert {r["metric"] for r in rows} == set(METRICS) - {"batch_stat_deviation"}  # layer_norm: no batch stats
    # Eval mode (no dropout): two runs agree exactly although the model was left in train mode.
    again = collect(model, {"input_ids": ids, "labels": ids}, ["hidden_rms", "param_grad_norm"])
    first = {(r["metric"], r["layer"], r.get("variant")): r["value"] for r in rows}
    assert all(first[(r["metric"], r["layer"], r.get("variant"))] == r["value"] for r in again)


def test_right_padding_invariance_on_the_decoder() -> None:
    model = _decoder(norm="rms_norm")
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 256, (n,), generator=g) for n in (8, 5, 3)]
    ids = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    ids[mask == 0] = 7  # arbitrary pad content
    padded = collect(model, {"input_ids": ids, "attention_mask": mask})
    singles = collect(model, [s[None] for s in seqs])
    key = ("metric", "layer", "variant", "head", "gap")
    a = {tuple(r.get(k) for k in key): r["value"] for r in padded}
    b = {tuple(r.get(k) for k in key): r["value"] for r in singles}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=0), k


def test_hidden_states_fallback_without_block_list() -> None:
    class NoList(nn.Module):
        """Hides its blocks in a plain list attribute, so only output_hidden_states is available."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.blocks_ = nn.ModuleDict({"a": Rotate(), "b": Scale(2.0)})

        def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> Any:
            x = self.embed(input_ids)
            hs = [x]
            for block in self.blocks_.values():
                x = block(x)
                hs.append(x)
            return {"hidden_states": tuple(hs) if output_hidden_states else None}

    rows = collect(NoList(), torch.tensor([[1, 2, 3]]), ["angular_distance"])
    d = {r["layer"]: r["value"] for r in rows if r["variant"] == "all_tokens"}
    assert d == pytest.approx({1: 0.5, 2: 0.0}, abs=1e-7)
    with pytest.raises(ValueError, match="could not find the block list"):
        collect(NoList(), torch.tensor([[1, 2, 3]]), ["param_grad_norm"])


def test_collect_argument_errors() -> None:
    model = _decoder()
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match=r"unknown metrics \['variance'\]"):
        collect(model, ids, ["variance"])
    with pytest.raises(TypeError, match="expected metrics to be a sequence of names, got the string"):
        collect(model, ids, "hidden_rms")
    with pytest.raises(TypeError, match="expected model to be a torch.nn.Module"):
        collect(object(), ids)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected batch to be a Tensor, a mapping or an iterable"):
        collect(model, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected at least one batch"):
        collect(model, [])
    with pytest.raises(ValueError, match=r"expected attention_mask of size \[2, 8\]"):
        collect(model, {"input_ids": ids, "attention_mask": torch.ones(2, 8)[:, :5]}, ["hidden_rms"])
    with pytest.raises(ValueError, match="has no loss"):
        collect(model, ids, ["layer_skip_delta_loss"])
    assert set(DEFAULT_METRICS) <= set(METRICS)


def test_per_layer_series_and_plot(tmp_path: Any) -> None:
    rows = [
        {"metric": "m", "layer": 2, "value": 4.0, "variant": "a"},
        {"metric": "m", "layer": 1, "value": 1.0, "variant": "a"},
        {"metric": "m", "layer": 1, "value": 3.0, "variant": "a", "step": 1},
        {"metric": "m", "layer": 1, "value": 9.0, "variant": "a", "head": 0},
        {"metric": "m", "layer": None, "value": 5.0, "variant": "a"},
        {"metric": "other", "layer": 1, "value": 0.0},
    ]
    series = per_layer_series(rows, "m")
    assert series == {"variant=a": [(1, 2.0), (2, 4.0)]}  # steps averaged, head rows and layer None left out
    require("matplotlib", "plot")
    out = plot_per_layer(rows, "m", tmp_path / "sub" / "m.png", logy=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no rows with metric='missing'"):
        plot_per_layer(rows, "missing", tmp_path / "x.png")
