"""Failure diagnosis in the runner: on a short real run of the default suite's DyT setting, the saturation,
frozen-gradient and hidden-scale detectors fire on the bare DyT arm and stay quiet on LayerNorm; and the gradient
bookkeeping of :class:`HealthMonitor` on a toy model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from normlab.lab.config import load_suite
from normlab.lab.dist import DistInfo
from normlab.lab.findings import EXPLODING, FROZEN, SATURATED, diagnose
from normlab.lab.health import HealthMonitor
from normlab.lab.report import render_report
from normlab.lab.runner import run_suite
from normlab.lab.schema import read_rows

# The default suite's model, optimizer and schedule shape; shorter windows and evals so that it runs in ~15 s of
# CPU. The final DyT's input reaches RMS ~200 by step 40, and from then on every earlier gradient is exactly zero.
SHORT = {"steps": 60, "eval_every": 20, "seeds": [0], "seq_len": 32, "eval_batches": 1, "eval_batch_size": 8,
         "diagnostics": []}


@pytest.fixture(scope="module")
def dyt_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    cfg = load_suite("default", SHORT, ["dyt", "layer_norm"])
    assert cfg.model["d_model"] == 128 and cfg.model["n_layers"] == 6 and cfg.lr == 3e-3
    run_dir = tmp_path_factory.mktemp("health") / "run"
    run_suite(cfg, run_dir, progress=False)
    rows, _ = read_rows(run_dir / "rows.jsonl")
    return run_dir, rows


def _health(rows: list[dict[str, Any]], arm: str, metric: str) -> dict[int, float]:
    return {r["step"]: r["value"] for r in rows if r["arm"] == arm and r["kind"] == "health" and r["metric"] == metric}


def test_detectors_fire_on_bare_dyt(dyt_run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, rows = dyt_run
    saturation = _health(rows, "dyt", "saturation_max")
    assert sorted(saturation) == [0, 20, 40, 60] and saturation[0] == 0.0 and saturation[60] >= SATURATED
    per_norm = {r["metric"] for r in rows if r["arm"] == "dyt" and r["metric"].startswith("saturation:")}
    assert "saturation:final_norm" in per_norm and len(per_norm) == 13  # 2 per block x 6, and the final norm
    frozen = _health(rows, "dyt", "frozen_fraction")
    assert sorted(frozen) == [20, 40, 60] and frozen[60] >= FROZEN
    frozen_row = next(r for r in rows if r["arm"] == "dyt" and r["metric"] == "frozen_fraction" and r["step"] == 60)
    assert frozen_row["steps"] == 20 and frozen_row["frozen_tensors"] > 100 and frozen_row["names"]
    assert max(_health(rows, "dyt", "hidden_rms_max").values()) >= EXPLODING
    flags = diagnose(rows, ["dyt"], [0])["dyt"].flags()
    assert [f.split(":")[0] for f in flags] == ["saturated", "frozen", "exploding hidden state"]


def test_detectors_stay_quiet_on_layer_norm(dyt_run: tuple[Path, list[dict[str, Any]]]) -> None:
    run_dir, rows = dyt_run
    assert _health(rows, "layer_norm", "saturation_max") == {}  # no bounded norm to measure
    assert set(_health(rows, "layer_norm", "frozen_fraction").values()) == {0.0}
    assert max(_health(rows, "layer_norm", "hidden_rms_max").values()) < EXPLODING
    assert diagnose(rows, ["layer_norm"], [0])["layer_norm"].flags() == []
    md = render_report(run_dir, plots=False).read_text(encoding="utf-8")
    diagnosis = md[md.index("## Diagnosis"):]
    assert "| layer_norm | no bounded norm | 0% |" in diagnosis and "| dyt | 100% `" in diagnosis
    claims = md[md.index("## Claims"):md.index("## Diagnosis")]
    assert "dyt_as_written" in claims and "dyt_in_blocks" not in claims  # --arms kept the claims on its arms


def test_health_monitor_counts_only_gradients_that_are_zero_at_every_step() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    unused = nn.Parameter(torch.ones(3))
    model.register_parameter("unused", unused)
    monitor = HealthMonitor(model, DistInfo())
    for step in range(3):
        model.zero_grad(set_to_none=True)
        x = torch.ones(1, 2)
        loss = model(x).sum() * (1.0 if step == 1 else 0.0)  # only step 1 moves anything
        loss.backward()
        monitor.after_backward()
    with monitor.watch() as rows:
        model(torch.ones(1, 2))
    frozen = next(r for r in rows if r["metric"] == "frozen_fraction")
    total = sum(p.numel() for p in model.parameters())
    assert frozen["names"] == ["unused"] and frozen["frozen_tensors"] == 1 and frozen["steps"] == 3
    assert frozen["value"] == pytest.approx(3 / total)
    assert not any(r["metric"].startswith(("saturation", "hidden")) for r in rows)  # no bounded norm, no blocks
    with monitor.watch() as rows:  # the interval restarted: no gradient seen since
        pass
    assert rows == []
