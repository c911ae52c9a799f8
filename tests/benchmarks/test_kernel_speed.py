"""Smoke test of the kernel benchmark's quick mode: rows, backends, limits and env record (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest


def _load() -> object:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_speed.py"
    spec = importlib.util.spec_from_file_location("kernel_speed", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernel_speed"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_has_both_backends_and_the_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load()
    out = tmp_path / "run"
    assert mod.main(["--quick", "--threads", "1", "--out", str(out)]) == 0  # type: ignore[attr-defined]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    keys = {(r["variant"], r["backend"], r["pass"], r["dtype"]) for r in rows}
    for dtype in ("fp32", "bf16"):
        assert {("clone", "limit", "fwd", dtype), ("copy_", "limit", "fwd", dtype)} <= keys
        for backend in ("cpu", "composite"):
            for passes in ("fwd", "fwd+bwd"):
                assert ("rms_norm", backend, passes, dtype) in keys and ("dyt", backend, passes, dtype) in keys
    for r in rows:
        assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert (r["ratio_to_clone_p50"] is None) == (r["pass"] != "fwd"), r
    env = json.loads((out / "env.json").read_text())
    assert env["threads"] == 1 and env["kernel_backends"]["rms_norm"] == "cpu"
    assert "x clone" in capsys.readouterr().out and (out / "table.txt").exists()
