"""``torchrun --standalone --nproc_per_node=2 -m normlab lab``: two gloo processes on CPU; rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from normlab.lab.schema import read_rows, row_key
from tests.lab.conftest import toml_of


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path: Path, tiny: dict[str, Any]) -> None:
    tiny.update(steps=10, seeds=[0], diagnostics_at=[10])
    suite = tmp_path / "ddp.toml"
    suite.write_text(toml_of(tiny))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "normlab", "lab", "--suite", str(suite), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run dir:") == 1  # only rank 0 reports
    assert json.loads((out / "env.json").read_text())["world_size"] == 2
    rows, torn = read_rows(out / "rows.jsonl")
    keys = [row_key(r) for r in rows]
    assert not torn and len(keys) == len(set(keys))
    assert sorted(r["status"] for r in rows if r["kind"] == "status") == ["ok", "ok"]
    assert sorted(r["step"] for r in rows if r["arm"] == "ln" and r["metric"] == "val_loss") == [0, 5, 10]


@pytest.mark.slow
def test_torchrun_without_out_claims_one_run_directory(tmp_path: Path, tiny: dict[str, Any]) -> None:
    """Only rank 0 picks and creates the run directory; the other ranks get its path (no stray empty directories)."""
    tiny.update(steps=2, eval_every=1, warmup_steps=0, seeds=[0], diagnostics_at=[], arms=tiny["arms"][:1])
    suite = tmp_path / "ddp.toml"
    suite.write_text(toml_of(tiny))
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "normlab", "lab", "--suite", str(suite), "--runs-dir", str(runs), "--no-progress", "--no-report"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = list(runs.iterdir())
    assert len(dirs) == 1 and (dirs[0] / "env.json").is_file()
    assert json.loads((dirs[0] / "env.json").read_text())["world_size"] == 2
