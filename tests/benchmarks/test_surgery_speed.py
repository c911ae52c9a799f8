"""Smoke test of the surgery benchmark's quick mode: a row per (model, batch, variant), the Post-LN model's exact
conversions recorded as refused, every converted variant checked against its reference by the benchmark itself, and
the ratio summaries recomputable from the raw per-repetition times (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests._extras import require
from tests.benchmarks._scripts import load_script


def _load() -> ModuleType:
    return load_script("surgery_speed")


def test_quick_run_writes_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require("transformers", "hf")
    mod = _load()
    out = tmp_path / "run"
    assert mod.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    cases = sorted((r["model"], r["batch"], r["variant"]) for r in rows)
    assert cases == sorted((m, b, v) for m in mod.QUICK_MODELS for b in (1, 2) for v in mod.VARIANTS)
    by_case = {(r["model"], r["batch"], r["variant"]): r for r in rows}
    for r in rows:
        if r["model"] == "bert_tiny" and r["variant"] in ("rms_norm", "crms_norm"):
            assert r["status"] == "refused" and "is a Post-LN model" in r["error"]
            continue
        assert r["status"] == "ok", r
        assert r["max_rel_err"] < 1e-5  # fp32: exact conversions vs the original, exports vs the fixed-scale model
        ms = np.asarray(r["samples_ms"])
        assert len(ms) == r["reps"] == 3 and (ms > 0).all()
        base = np.asarray(by_case[(r["model"], r["batch"], "original")]["samples_ms"])
        got = [r[f"ratio_to_original_{p}"] for p in ("p20", "p50", "p80")]
        np.testing.assert_allclose(got, np.percentile(ms / base, [20, 50, 80]), rtol=1e-3, atol=1e-4)
    assert (out / "table.txt").read_text().startswith("model")
    assert json.loads((out / "env.json").read_text())["config"]["reps"] == 3
    assert "x original p20/p50/p80" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        mod.main(["--quick", "--out", str(out)])
