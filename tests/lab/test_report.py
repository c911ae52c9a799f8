"""The report is a pure function of the run directory: re-rendering gives identical files."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from normlab.lab.config import parse_suite
from normlab.lab.report import format_summary_table, load_run, render_report, summarize
from normlab.lab.runner import run_suite


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.lab.conftest import TINY

    data: dict[str, Any] = {**TINY, "arms": [*TINY["arms"], {"name": "absurd_lr", "norm": "rms_norm", "lr": 1e4}]}
    out = tmp_path_factory.mktemp("report") / "run"
    run_suite(parse_suite(data), out, progress=False)
    return out


def test_render_twice_is_identical_and_self_contained(run_dir: Path, tmp_path: Path) -> None:
    md = render_report(run_dir)
    first_md, first_html = md.read_text(), (run_dir / "report.html").read_text()
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for p in ("report.md", "report.html", "plots"):
        target = copy / p
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    render_report(copy)
    assert (copy / "report.md").read_text() == first_md
    assert (copy / "report.html").read_text() == first_html
    assert "data:image/png;base64," in first_html and "<img" in first_html and 'src="plots/' not in first_html
    for name in ("val_loss.png", "train_loss.png", "throughput.png", "diag_hidden_variance_all_elements.png"):
        assert f"plots/{name}" in first_md and (run_dir / "plots" / name).stat().st_size > 1000


def test_summary_ranks_ok_arms_and_reports_mean_std(run_dir: Path) -> None:
    summaries = summarize(load_run(run_dir))
    assert [s.arm for s in summaries][-1] == "absurd_lr" and summaries[-1].rank is None
    ranked = [s for s in summaries if s.rank]
    assert [s.rank for s in ranked] == [1, 2]
    means = [s.mean_std(s.final)[0] for s in ranked]
    assert means == sorted(means)
    table = format_summary_table(run_dir)
    assert "final val loss" in table and "0/2 (diverged)" in table and " ± " in table
    md = (run_dir / "report.md").read_text() if (run_dir / "report.md").exists() else render_report(run_dir).read_text()
    assert "absurd_lr seed 0: diverged" in md and "eval mode" in md


def test_report_without_plots(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "np"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("plots", "report.*"))
    render_report(copy, plots=False)
    assert "| rank |" in (copy / "report.md").read_text() and not (copy / "plots").exists()
