"""Smoke test of the speed benchmark's quick mode: rows and env record with the right schema (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from normlab.registry import list_norms


def _load() -> object:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "norm_speed.py"
    spec = importlib.util.spec_from_file_location("norm_speed", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["norm_speed"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_rows_for_every_norm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load()
    out = tmp_path / "run"
    assert mod.main(["--quick", "--threads", "1", "--out", str(out)]) == 0  # type: ignore[attr-defined]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    variants = {r["variant"] for r in rows}
    assert {s.name for s in list_norms()} <= variants and "torch.LayerNorm" in variants
    for r in rows:
        assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["pass"] in ("fwd", "fwd+bwd")
    ln = [r for r in rows if r["variant"] == "torch.LayerNorm"]
    assert all(r["ratio_to_torch_layernorm_p50"] == 1.0 for r in ln)
    assert "torch" in json.loads((out / "env.json").read_text())
    assert "x torch LN" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        mod.main(["--quick", "--out", str(out)])  # type: ignore[attr-defined]
