"""Smoke test of the fold benchmark's quick mode: rows and env record with the right schema (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

KEYS = {
    "model", "batch", "tokens", "device", "dtype", "variant", "folded", "n_folded", "p20_ms", "p50_ms", "p80_ms",
    "ratio_to_identity_p20", "ratio_to_identity_p50", "ratio_to_identity_p80", "layer_norm_over_this_p20",
    "layer_norm_over_this_p50", "layer_norm_over_this_p80", "param_bytes", "buffer_bytes", "peak_alloc_bytes",
    "fold_max_rel_err", "reps", "inner", "status",
}  # fmt: skip


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fold_speed.py"
    spec = importlib.util.spec_from_file_location("fold_speed", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fold_speed"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_rows_with_the_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load()
    out = tmp_path / "run"
    assert mod.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    variants = [v[0] for v in mod.VARIANTS]
    assert len(rows) == 2 * 2 * len(variants)  # 2 tiny models x batches 1, 2
    for r in rows:
        assert r["status"] == "ok", r
        assert set(r) == KEYS and r["variant"] in variants
        assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["param_bytes"] > 0
        if r["folded"]:  # the benchmark checks its own folds: exact to fp32 rounding
            assert r["n_folded"] == 5 and r["fold_max_rel_err"] <= 1e-5
        else:
            assert r["n_folded"] == 0 and r["fold_max_rel_err"] is None
    limit = [r for r in rows if r["variant"] == mod.LIMIT]
    assert all(r["ratio_to_identity_p50"] == 1.0 for r in limit)
    env = json.loads((out / "env.json").read_text())
    assert "torch" in env and env["config"]["reps"] == 3
    assert "x identity p20/p50/p80" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        mod.main(["--quick", "--out", str(out)])
