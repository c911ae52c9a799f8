"""Smoke test of the fold benchmark's quick mode: rows and env record with the right schema, every case present, folds
exact, and every summary recomputable from the raw per-repetition times against the right baseline (no timing
asserts)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.benchmarks._scripts import load_script

KEYS = {
    "model", "batch", "tokens", "device", "dtype", "variant", "folded", "n_folded", "p20_ms", "p50_ms", "p80_ms",
    "ratio_to_identity_p20", "ratio_to_identity_p50", "ratio_to_identity_p80", "layer_norm_over_this_p20",
    "layer_norm_over_this_p50", "layer_norm_over_this_p80", "param_bytes", "buffer_bytes", "peak_alloc_bytes",
    "fold_max_rel_err", "reps", "inner", "status", "samples_ms",
}  # fmt: skip


def _load() -> ModuleType:
    return load_script("fold_speed")


def test_quick_run_writes_rows_with_the_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load()
    out = tmp_path / "run"
    assert mod.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    variants = [v[0] for v in mod.VARIANTS]
    cases = [(r["model"], r["batch"], r["variant"]) for r in rows]
    assert sorted(cases) == sorted((m, b, v) for m in mod.QUICK_MODELS for b in (1, 2) for v in variants)
    by_case = {(r["model"], r["batch"], r["variant"]): r for r in rows}
    for r in rows:
        assert r["status"] == "ok", r
        assert set(r) == KEYS and r["param_bytes"] > 0
        assert r["folded"] == r["variant"].endswith("+fold")
        if r["folded"]:  # the benchmark checks its own folds: exact to fp32 rounding
            assert r["n_folded"] == 5 and r["fold_max_rel_err"] < 1e-5
        else:
            assert r["n_folded"] == 0 and r["fold_max_rel_err"] is None
        ms = np.asarray(r["samples_ms"])
        assert len(ms) == r["reps"] == 3 and (ms > 0).all()
        np.testing.assert_allclose([r[f"{p}_ms"] for p in ("p20", "p50", "p80")], np.percentile(ms, [20, 50, 80]),
                                   rtol=1e-3, atol=1e-4)
        # Ratios per repetition against the same (model, batch)'s baseline, then summarised.
        limit = np.asarray(by_case[(r["model"], r["batch"], mod.LIMIT)]["samples_ms"])
        ln = np.asarray(by_case[(r["model"], r["batch"], "layer_norm")]["samples_ms"])
        for key, want in (("ratio_to_identity", ms / limit), ("layer_norm_over_this", ln / ms)):
            got = [r[f"{key}_{p}"] for p in ("p20", "p50", "p80")]
            np.testing.assert_allclose(got, np.percentile(want, [20, 50, 80]), rtol=1e-3, atol=1e-4, err_msg=key)
    env = json.loads((out / "env.json").read_text())
    assert "torch" in env and env["config"]["reps"] == 3
    assert "x identity p20/p50/p80" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        mod.main(["--quick", "--out", str(out)])
