"""--scale presets: applied over the file and under the command line, validated, recorded in the config and the
report; every packaged suite is valid at every scale; and the default suite's smoke scale runs end to end with its
Claims and Diagnosis sections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from normlab.cli import main
from normlab.lab.claims import VERDICTS
from normlab.lab.config import (
    SCALES,
    SuiteError,
    apply_scale,
    list_suites,
    load_suite,
    parse_suite,
    validate_suite_dict,
)
from normlab.lab.validate import dry_run_problems
from tests.lab.conftest import toml_of


@pytest.mark.parametrize("name", sorted(list_suites()))
@pytest.mark.parametrize("scale", SCALES)
def test_packaged_suites_are_valid_at_every_scale(name: str, scale: str) -> None:
    from normlab.lab.config import read_suite_dict

    data, origin = read_suite_dict(name)
    if scale == "paper":  # validated without building the paper-size models (seconds each on a CPU)
        scaled, problems = apply_scale(data, scale)
        cfg, more, _ = validate_suite_dict(scaled, origin)
        problems += more
    else:
        cfg, problems = dry_run_problems(data, origin, scale=scale)
    assert problems == [] and cfg.scale == scale and cfg.claims
    if scale == "default":
        assert cfg.to_dict() == load_suite(name).to_dict()


def test_scale_replaces_settings_merges_the_model_and_yields_to_the_command_line() -> None:
    base = load_suite("default")
    smoke = load_suite("default", scale="smoke")
    assert smoke.scale == "smoke" and smoke.steps < base.steps and smoke.model["d_model"] < base.model["d_model"]
    assert smoke.model["mlp"] == base.model["mlp"] == "gelu"  # merged key by key, not replaced
    assert smoke.warmup_of() == round(0.1 * smoke.steps)  # the warm-up is relative to the schedule
    cli = load_suite("default", {"steps": 12, "model.d_model": 48}, scale="smoke")
    assert cli.steps == 12 and cli.model["d_model"] == 48 and cli.model["n_layers"] == smoke.model["n_layers"]
    again = parse_suite(smoke.to_dict())  # a stored config is not scaled twice
    assert again.to_dict() == smoke.to_dict()


def test_scale_problems(tiny: dict[str, Any]) -> None:
    assert apply_scale(tiny, "huge")[1] == ["--scale: expected one of ('smoke', 'default', 'paper'), got 'huge'"]
    assert "defines no [scales.paper] table; its scales: ['default']" in apply_scale(tiny, "paper")[1][0]
    tiny["scales"] = {"smoke": {"steps": 0, "name": "x", "model": {"d_model": 8}}, "tiny": {}}
    with pytest.raises(SuiteError) as info:
        parse_suite(tiny)
    text = "\n".join(info.value.problems)
    assert "scales.smoke: steps: expected an int >= 1, got 0" in text
    assert "scales.smoke: unknown key 'name'" in text and "scales.tiny: expected a preset named one of" in text


def test_cli_scale_runs_records_and_refuses_resume(tmp_path: Path, tiny: dict[str, Any],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    tiny.update(seeds=[0], steps=8, eval_every=4, diagnostics_at=[8], arms=[{"name": "ln", "norm": "layer_norm"}])
    tiny["scales"] = {"smoke": {"steps": 4, "eval_every": 2, "model": {"d_model": 16}}}
    suite = tmp_path / "s.toml"
    suite.write_text(toml_of(tiny))
    out = tmp_path / "run"
    assert main(["lab", "--suite", str(suite), "--scale", "smoke", "--out", str(out), "--no-progress",
                 "--set", "diagnostics_at=[4]"]) == 0
    config = json.loads((out / "env.json").read_text())["config"]
    assert config["scale"] == "smoke" and config["steps"] == 4 and config["model"]["d_model"] == 16
    assert "scale: `smoke`" in (out / "report.md").read_text()
    assert main(["lab", "--resume", str(out), "--scale", "paper"]) == 2
    assert "--scale" in capsys.readouterr().err


def test_default_suite_smoke_scale_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "smoke"
    assert main(["lab", "--scale", "smoke", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "final val loss" in printed and "dyt_ln_final" in printed  # the summary table stays
    md = (out / "report.md").read_text(encoding="utf-8")
    claims = md[md.index("## Claims"):md.index("## Diagnosis")]
    cfg = load_suite("default")
    for claim in cfg.claims:
        line = next(ln for ln in claims.splitlines() if f"**{claim.id}**" in ln)
        assert line.rstrip(" |").split(" | ")[-1].split(" (")[0] in VERDICTS
    diagnosis = md[md.index("## Diagnosis"):]
    assert all(f"| {a.name} |" in diagnosis for a in cfg.arms)
    assert "## Claims" in (out / "report.html").read_text(encoding="utf-8").replace("<h2>Claims</h2>", "## Claims")
