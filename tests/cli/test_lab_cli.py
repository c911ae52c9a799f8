"""``normlab lab`` and ``normlab report`` through ``cli.main``."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from normlab.cli import main
from tests.lab.conftest import TINY, toml_of


@pytest.fixture
def tiny() -> dict[str, Any]:
    return copy.deepcopy(TINY)


def test_list_shows_packaged_suites(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("default", "placement", "digits"))


def test_dry_run_valid_and_invalid(tmp_path: Path, tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "--suite", "default", "--dry-run"]) == 0
    assert "is valid" in capsys.readouterr().out
    tiny["arms"].append({"name": "bad", "norm": "nope_norm", "depth": 3})
    tiny["steps"] = -1
    bad = tmp_path / "bad.toml"
    bad.write_text(toml_of(tiny))
    assert main(["lab", "--suite", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "unknown norm 'nope_norm'" in err and "'depth'" in err and "steps" in err


def test_run_then_report_then_refuse_and_resume_rules(
    tmp_path: Path, tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    tiny.update(steps=10, seeds=[0], diagnostics_at=[10])
    suite = tmp_path / "t.toml"
    suite.write_text(toml_of(tiny))
    out = tmp_path / "run"
    assert main(["lab", "--suite", str(suite), "--out", str(out), "--no-progress", "--set", "lr=0.002",
                 "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert f"run dir: {out}" in text and "report.md" in text and "final val loss" in text
    assert (out / "report.html").exists()
    assert '"lr": 0.002' in (out / "env.json").read_text()  # CLI beats the file
    assert json.loads((out / "env.json").read_text())["env"]["torch_threads"] == 1
    md = (out / "report.md").read_text()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == md
    capsys.readouterr()
    assert main(["lab", "--suite", str(suite), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["lab", "--resume", str(out), "--suite", "default"]) == 2
    assert main(["report", str(tmp_path)]) == 2


def test_new_run_dir_per_invocation(tmp_path: Path, tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    tiny.update(steps=2, warmup_steps=0, eval_every=1, seeds=[0], diagnostics_at=[], arms=tiny["arms"][:1])
    suite = tmp_path / "t.toml"
    suite.write_text(toml_of(tiny))
    for _ in range(2):
        assert main(["lab", "--suite", str(suite), "--runs-dir", str(tmp_path / "runs"), "--no-progress",
                     "--no-report"]) == 0
    dirs = sorted((tmp_path / "runs").iterdir())
    assert len(dirs) == 2 and all(d.name.startswith("tiny-") for d in dirs)
