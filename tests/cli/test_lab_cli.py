"""``normlab lab`` and ``normlab report`` through ``cli.main``."""

from __future__ import annotations

import copy
import json
import re
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
    assert main(["lab", "--steps", "10", "--dry-run"]) == 0  # the warm-up is 10% of the steps, not a fixed 20
    assert "runs of 10 steps" in capsys.readouterr().out
    tiny["arms"].append({"name": "bad", "norm": "nope_norm", "depth": 3})
    tiny["steps"] = -1
    bad = tmp_path / "bad.toml"
    bad.write_text(toml_of(tiny))
    assert main(["lab", "--suite", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "unknown norm 'nope_norm'" in err and "'depth'" in err and "steps" in err


def test_dry_run_reports_every_problem_across_arms(
    tmp_path: Path, tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    tiny["steps"] = -1
    tiny["warmup_steps"] = 0
    tiny["arms"] = [
        # three model-config problems in one arm: the model config alone stops at the first
        {"name": "multi", "norm": "nope_norm", "placement": "sideways", "n_heads": 3},
        {"name": "gn7", "norm": "group_norm", "norm_kwargs": {"num_groups": 7}},  # found only by building
        {"name": "ref", "norm": "power_norm", "norm_kwargs": {"warmup_iters": "warmup_stepz"}},
        {"name": "ok", "norm": "layer_norm", "colour": "red"},
    ]
    bad = tmp_path / "bad.toml"
    bad.write_text(toml_of(tiny))
    assert main(["lab", "--suite", str(bad), "--dry-run", "--arms", "multi,gn7,ref,ok,ghost"]) == 2
    err = capsys.readouterr().err
    for pattern in (
        r"--arms: unknown arm\(s\) \['ghost'\]",
        r"steps: expected an int >= 1, got -1",
        r"arms\[0\] \(multi\): unknown norm 'nope_norm'",
        r"arms\[0\] \(multi\): TransformerConfig: expected placement in .*got 'sideways'",
        r"arms\[0\] \(multi\): TransformerConfig: expected d_model divisible by n_heads",
        r"arms\[1\] \(gn7\): ValueError: .*num_groups",
        r"arms\[2\] \(ref\): norm_kwargs.warmup_iters: schedule reference 'warmup_stepz'",
        r"arms\[3\] \(ok\): unknown key 'colour'",
    ):
        assert re.search(pattern, err), (pattern, err)
    assert "8 problem(s)" in err  # each once: nothing reported twice


def test_digits_without_scikit_learn_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import normlab._env as env_mod
    from normlab.data import load_digits_split

    monkeypatch.setattr(env_mod, "module_available", lambda module: module != "sklearn")
    with pytest.raises(ImportError, match=r"scikit-learn .*'sklearn'.* pip install 'normlab\[data\]'"):
        load_digits_split()  # the loader and the lab's check read the same declaration
    assert main(["lab", "--suite", "digits", "--dry-run"]) == 2
    assert "pip install 'normlab[data]'" in capsys.readouterr().err
    runs = tmp_path / "runs"
    assert main(["lab", "--suite", "digits", "--runs-dir", str(runs), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs scikit-learn" in err and "pip install 'normlab[data]'" in err
    assert not runs.exists()  # refused before any run directory was made
    monkeypatch.undo()
    assert main(["lab", "--suite", "digits", "--dry-run"]) == 0


def _two_step_suite(tmp_path: Path, tiny: dict[str, Any]) -> Path:
    """A one-arm, one-seed, two-step suite file: the smallest run that writes every kind of file."""
    tiny.update(steps=2, warmup_steps=0, eval_every=1, seeds=[0], diagnostics_at=[], arms=tiny["arms"][:1])
    suite = tmp_path / "t.toml"
    suite.write_text(toml_of(tiny))
    return suite


def test_out_pointing_at_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "results.txt"
    target.write_text("not a run\n")
    assert main(["lab", "--suite", "default", "--out", str(target)]) == 2
    assert re.search(r"--out .*results.txt exists and is not a directory", capsys.readouterr().err)
    assert target.read_text() == "not a run\n"


def test_a_second_process_cannot_resume_a_locked_run(
    tmp_path: Path, tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from normlab.lab.rundir import lock_run_dir

    suite = _two_step_suite(tmp_path, tiny)
    out = tmp_path / "run"
    assert main(["lab", "--suite", str(suite), "--out", str(out), "--no-progress", "--no-report"]) == 0
    events = (out / "events.jsonl").read_text()
    held = lock_run_dir(out)  # stands in for a first `--resume` still running
    try:
        capsys.readouterr()
        assert main(["lab", "--resume", str(out), "--no-progress", "--no-report"]) == 2
        assert re.search(r"run directory .*run is in use by another normlab lab process", capsys.readouterr().err)
        assert (out / "events.jsonl").read_text() == events  # it touched nothing
    finally:
        assert held is not None
        held.close()
    assert main(["lab", "--resume", str(out), "--no-progress", "--no-report"]) == 0


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
    suite = _two_step_suite(tmp_path, tiny)
    for _ in range(2):
        assert main(["lab", "--suite", str(suite), "--runs-dir", str(tmp_path / "runs"), "--no-progress",
                     "--no-report"]) == 0
    dirs = sorted((tmp_path / "runs").iterdir())
    assert len(dirs) == 2 and all(d.name.startswith("tiny-") for d in dirs)


def test_out_left_by_a_failed_start_can_be_reused(
    tmp_path: Path, tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    suite = _two_step_suite(tmp_path, tiny)
    out = tmp_path / "run"
    out.mkdir()
    # what a start killed before (or while) writing env.json leaves: its lock and a temporary env.json
    (out / ".lock").write_text("12345\n")
    (out / "env.json.k7x2q9.tmp").write_text('{"schema": 1, "sui')
    assert main(["lab", "--resume", str(out), "--no-progress", "--no-report"]) == 2  # nothing to resume
    assert re.search(r"is not a lab run directory: .*env\.json is missing", capsys.readouterr().err)
    assert main(["lab", "--suite", str(suite), "--out", str(out), "--no-progress", "--no-report"]) == 0
    assert json.loads((out / "env.json").read_text())["suite"] == "tiny"
    assert not list(out.glob("env.json.*.tmp"))  # the stale temporary file was removed
    capsys.readouterr()
    # a directory with anything else in it is still refused
    other = tmp_path / "other"
    other.mkdir()
    (other / ".lock").write_text("")
    (other / "notes.txt").write_text("mine\n")
    assert main(["lab", "--suite", str(suite), "--out", str(other), "--no-progress", "--no-report"]) == 2
    assert re.search(r"--out .*other exists and is not empty", capsys.readouterr().err)
    assert sorted(p.name for p in other.iterdir()) == [".lock", "notes.txt"]


def test_a_missing_file_during_training_is_not_turned_into_a_usage_error(
    tmp_path: Path, tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import normlab.lab.runner as runner

    def gone(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError("[Errno 2] No such file or directory: '/usr/lib/python3/os.py'")

    suite = _two_step_suite(tmp_path, tiny)
    monkeypatch.setattr(runner, "make_task", gone)  # the data went missing after the run started
    with pytest.raises(FileNotFoundError, match=r"No such file or directory: '/usr/lib/python3/os\.py'"):
        main(["lab", "--suite", str(suite), "--out", str(tmp_path / "run"), "--no-progress", "--no-report"])
