"""Smoke test of the speed benchmark's quick mode: rows (backends, dtypes, limits) and env record with the right
schema (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from normlab.registry import list_norms
from tests.benchmarks._scripts import load_script


def _load() -> object:
    return load_script("norm_speed")


def test_quick_run_writes_rows_for_every_norm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load()
    out = tmp_path / "run"
    assert mod.main(["--quick", "--threads", "1", "--out", str(out)]) == 0  # type: ignore[attr-defined]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    variants = {r["variant"] for r in rows}
    assert {s.name for s in list_norms()} <= variants and "torch.LayerNorm" in variants
    for r in rows:
        assert r["status"] == "ok", r
        assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["pass"] in ("fwd", "fwd+bwd")
        assert (r["ratio_to_clone_p50"] is None) == (r["pass"] != "fwd"), r
    ln = [r for r in rows if r["variant"] == "torch.LayerNorm"]
    assert all(r["ratio_to_torch_layernorm_p50"] == 1.0 for r in ln)
    keys = {(r["variant"], r["backend"], r["pass"], r["dtype"]) for r in rows}
    for dtype in ("fp32", "bf16"):
        assert {("clone", "limit", "fwd", dtype), ("copy_", "limit", "fwd", dtype)} <= keys
        for backend in ("cpu", "composite"):  # every norm with kernels, and the fused add + norm ops, on both
            for name in ("rms_norm", "dyt", "batch_norm", "rep_batch_norm", "add_rms_norm"):
                assert {(name, backend, p, dtype) for p in ("fwd", "fwd+bwd")} <= keys, (name, backend)
        assert ("power_norm", "composite", "fwd+bwd", dtype) in keys
    bn = [r for r in rows if r["variant"] == "batch_norm"]
    assert all(r["baseline"] == "torch.BatchNorm1d" and r["ratio_to_baseline_p50"] is not None for r in bn)
    env = json.loads((out / "env.json").read_text())
    assert "torch" in env and env["kernel_backends_cpu"] and len(env["load_average_at_start"]) == 3
    assert all(r["load_1min"] >= 0 for r in rows)
    assert "x torch LN" in capsys.readouterr().out and (out / "table.txt").exists()
    with pytest.raises(FileExistsError):
        mod.main(["--quick", "--out", str(out)])  # type: ignore[attr-defined]


class _Boom(torch.nn.Module):
    """Runs once (setup, warm-up) and then fails: a variant that breaks in the middle of the sweep."""

    def __init__(self, fail_after: int) -> None:
        super().__init__()
        self.calls, self.fail_after = 0, fail_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.fail_after:
            raise RuntimeError("boom: kernel exploded")
        return x * 1.0


def test_failing_variants_become_error_rows_and_the_sweep_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = _load()
    real = mod._variants  # type: ignore[attr-defined]

    def variants(c: int, dtype: torch.dtype) -> list[object]:
        vs = [v for v in real(c, dtype) if v.name in ("torch.LayerNorm", "layer_norm")]
        return [
            *vs,
            mod.Variant("unbuildable", None, lambda x: x, error="ValueError: no token layout"),  # type: ignore[attr-defined]
            mod.Variant("setup_fails", torch.nn.Linear(3, 3), lambda x: x),  # type: ignore[attr-defined]
            mod.Variant("fails_mid_sweep", _Boom(fail_after=4), lambda x: x),  # type: ignore[attr-defined]
        ]

    monkeypatch.setattr(mod, "_variants", variants)
    rows = mod.run([(16, 8)], 3, tmp_path / "run", {"fp32": torch.float32})  # type: ignore[attr-defined]
    by = {(r["variant"], r["pass"]): r for r in rows if r["backend"] != "cpu"}
    assert by[("unbuildable", "fwd")]["error"] == "ValueError: no token layout"
    assert by[("setup_fails", "fwd+bwd")]["status"] == "error" and "RuntimeError" in by[("setup_fails", "fwd")]["error"]
    assert any(r["status"] == "error" and "boom" in r["error"] for r in rows if r["variant"] == "fails_mid_sweep")
    for key in (("layer_norm", "fwd"), ("layer_norm", "fwd+bwd"), ("torch.LayerNorm", "fwd")):
        assert by[key]["status"] == "ok" and by[key]["p50_ms"] > 0  # the sweep went on
    saved = [json.loads(line) for line in (tmp_path / "run" / "rows.jsonl").read_text().splitlines()]
    assert sum(r["status"] == "error" for r in saved) == sum(r["status"] == "error" for r in rows) >= 5
    table = mod.format_table(rows)  # type: ignore[attr-defined]
    assert "error: ValueError: no token layout" in table


def test_torch_variants_compute_what_their_normlab_counterparts_do() -> None:
    """Like with like: each torch op normalises the same benchmark batch the same way as the norm it is shown next
    to (e.g. GroupNorm over groups of channels and all T tokens, not per token)."""
    mod = _load()
    c = 8
    base = torch.randn(1, 16, c)
    variants = {(v.name, v.backend): v for v in mod._variants(c)}  # type: ignore[attr-defined]
    paired = [v for v in variants.values() if v.same_as is not None]
    names = {v.name for v in paired}
    assert {"torch.GroupNorm", "torch.InstanceNorm1d", "torch.BatchNorm1d", "torch.LayerNorm"} <= names
    for v in paired:
        ours = variants[(v.same_as, "composite")]
        expected = ours.module.train()(ours.make_input(base))
        got = v.to_tokens(v.module.train()(v.make_input(base)))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda s, v=v: f"{v.name}: {s}")


def test_only_selects_the_named_norms_their_torch_twins_and_the_ratio_bases() -> None:
    mod = _load()
    picked = mod._selected(mod._variants(8), {"group_norm", "instance_norm"})  # type: ignore[attr-defined]
    keys = {(v.name, v.backend) for v in picked}
    assert keys == {("clone", "limit"), ("copy_", "limit"), ("torch.LayerNorm", "torch"), ("group_norm", "cpu"),
                    ("group_norm", "composite"), ("instance_norm", "cpu"), ("instance_norm", "composite"),
                    ("torch.GroupNorm", "torch"), ("group_norm[channel_dim=1]", "composite"),
                    ("torch.InstanceNorm1d", "torch")}
    assert len(mod._selected(mod._variants(8), None)) > len(picked)  # type: ignore[attr-defined]
