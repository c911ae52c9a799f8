"""A real ``kill -9`` of ``normlab lab`` in a subprocess mid-run, then ``--resume``: rows complete and unique."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from normlab.cli import main
from normlab.lab.config import parse_suite
from normlab.lab.schema import read_rows, row_key
from tests.lab.conftest import toml_of


@pytest.mark.slow
def test_sigkill_then_resume_completes_without_duplicates(tmp_path: Path, tiny: dict[str, Any]) -> None:
    tiny.update(steps=60, eval_every=10, diagnostics_at=[0, 60], seeds=[0, 1])
    suite = tmp_path / "kill.toml"
    suite.write_text(toml_of(tiny))
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "normlab", "lab", "--suite", str(suite), "--out", str(run_dir), "--no-report"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    rows_path = run_dir / "rows.jsonl"
    deadline = time.monotonic() + 90
    try:
        # kill once the second run (bn, seed 0) has written an eval past step 0: mid-suite, mid-run
        while time.monotonic() < deadline:
            if rows_path.exists() and b'"arm": "bn"' in rows_path.read_bytes() and b'"step": 20' in (
                b"\n".join(line for line in rows_path.read_bytes().splitlines() if b'"arm": "bn"' in line)
            ):
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.02)
        else:
            pytest.fail("the run did not reach the kill point in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    before, _ = read_rows(rows_path)
    assert not any(r["kind"] == "status" and r["arm"] == "bn" and r["seed"] == 1 for r in before)  # unfinished
    ckpts = list((run_dir / "ckpt").glob("*.pt"))
    assert ckpts
    # what the kill can cost: the rows of each unfinished run written after its last checkpoint (a run whose status
    # row is on disk is finished even if the kill came before its checkpoint was deleted: the resume keeps its rows)
    finished = {(r["arm"], r["seed"]) for r in before if r["kind"] == "status"}
    lost_rows = 0
    ckpt_steps: dict[tuple[str, int], int] = {}
    for path in ckpts:
        arm, seed = path.stem.rsplit("__seed", 1)
        if (arm, int(seed)) in finished:
            continue
        ckpt_step = ckpt_steps[(arm, int(seed))] = torch.load(path, map_location="cpu", weights_only=False)["state"][
            "step"]
        mine = [r for r in before if r["arm"] == arm and r["seed"] == int(seed)]
        assert max(r["step"] for r in mine) - ckpt_step <= tiny["eval_every"]  # at most one eval interval lost
        lost_rows += sum(r["step"] > ckpt_step for r in mine)

    assert main(["lab", "--resume", str(run_dir), "--no-report", "--no-progress"]) == 0
    resume = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()][1]
    assert resume["event"] == "resume" and resume["dropped_rows"] == lost_rows
    # and no more than the rows of one eval interval after each checkpoint (as the finished run has them)
    after, _ = read_rows(rows_path)
    one_interval = sum(
        1 for r in after if r["kind"] != "status" and (r["arm"], r["seed"]) in ckpt_steps
        and 0 < r["step"] - ckpt_steps[(r["arm"], r["seed"])] <= tiny["eval_every"]
    )
    assert resume["dropped_rows"] <= one_interval
    rows, torn = read_rows(rows_path)
    assert not torn
    keys = [row_key(r) for r in rows]
    assert len(keys) == len(set(keys))
    cfg = parse_suite(json.loads((run_dir / "env.json").read_text())["config"])
    for arm in cfg.arms:
        for seed in cfg.seeds:
            mine = [r for r in rows if r["arm"] == arm.name and r["seed"] == seed]
            assert [r["status"] for r in mine if r["kind"] == "status"] == ["ok"]
            assert sorted(r["step"] for r in mine if r["metric"] == "val_loss") == cfg.eval_steps()
            assert sorted(r["step"] for r in mine if r["metric"] == "train_loss") == cfg.eval_steps()[1:]
    # the rows up to each checkpoint survive the kill as they were (later ones were dropped and written again,
    # with a new throughput)
    kept = {row_key(r): r for r in rows}
    survivors = [r for r in before if r["step"] <= ckpt_steps.get((r["arm"], r["seed"]), r["step"])]
    assert all(kept[row_key(r)] == r for r in survivors)
    assert ckpt_steps  # the kill came mid-run: at least one unfinished run with a checkpoint
    for (arm, seed), ckpt_step in ckpt_steps.items():
        mine = [r for r in before if (r["arm"], r["seed"]) == (arm, seed)]
        # every eval up to the checkpoint was on disk before the kill (rows are written before their checkpoint)...
        assert sorted(r["step"] for r in mine if r["metric"] == "val_loss" and r["step"] <= ckpt_step) == [
            s for s in cfg.eval_steps() if s <= ckpt_step
        ]
        # ...and what it lost is rows of the one write at the next eval step, each written again by the resume
        next_eval = min(s for s in cfg.eval_steps() if s > ckpt_step)
        lost = [r for r in mine if r["step"] > ckpt_step]
        assert {r["step"] for r in lost} <= {next_eval}, (arm, seed, ckpt_step, sorted({r["step"] for r in lost}))
        rewritten = {row_key(r) for r in rows if (r["arm"], r["seed"]) == (arm, seed) and r["step"] == next_eval
                     and r["kind"] != "status"}
        assert {row_key(r) for r in lost} <= rewritten
        assert {r["metric"] for r in rows if row_key(r) in rewritten} >= {"train_loss", "grad_norm", "lr",
                                                                          "throughput", "val_loss"}
    assert not list((run_dir / "ckpt").glob("*"))
    events = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events == ["start", "resume", "finish"]
