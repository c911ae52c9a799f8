"""The runner on a tiny suite: row schema and uniqueness, eval cadence, divergence and error arms, env.json,
refusing to overwrite, resume after an interruption (rows dropped past the checkpoint, torn last line), DDP path."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as torch_dist

from normlab.lab.config import parse_suite
from normlab.lab.dist import init_distributed
from normlab.lab.runner import run_suite
from normlab.lab.schedule import lr_at
from normlab.lab.schema import read_rows, row_key, validate_row


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    rows, torn = read_rows(run_dir / "rows.jsonl")
    assert not torn
    return rows


def _check_complete(run_dir: Path, cfg: Any) -> list[dict[str, Any]]:
    """Every key once; each run has exactly one status row and, if ok, an eval at every eval step."""
    rows = _rows(run_dir)
    for r in rows:
        validate_row(r)
    keys = [row_key(r) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    for arm in cfg.arms:
        for seed in cfg.seeds:
            status = [r for r in rows if r["arm"] == arm.name and r["seed"] == seed and r["kind"] == "status"]
            assert len(status) == 1, (arm.name, seed)
            if status[0]["status"] == "ok":
                steps = sorted(r["step"] for r in rows if r["arm"] == arm.name and r["seed"] == seed
                               and r["metric"] == "val_loss")
                assert steps == cfg.eval_steps()
    assert not list((run_dir / "ckpt").glob("*")), "checkpoints of finished arms are removed"
    return rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from tests.lab.conftest import TINY

    data = json.loads(json.dumps(TINY))
    data["arms"] += [
        {"name": "absurd_lr", "norm": "rms_norm", "lr": 1e4},
        {"name": "broken", "norm": "group_norm", "norm_kwargs": {"num_groups": 7}},
    ]
    cfg = parse_suite(data)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_suite(cfg, run_dir, argv=["normlab", "lab", "--test"], progress=False)
    assert result.statuses[("ln", 0)] == "ok"
    return run_dir, cfg


def test_rows_schema_cadence_and_statuses(tiny_run: tuple[Path, Any]) -> None:
    run_dir, cfg = tiny_run
    rows = _check_complete(run_dir, cfg)
    status = {(r["arm"], r["seed"]): r for r in rows if r["kind"] == "status"}
    assert {k: v["status"] for k, v in status.items()} == {
        ("ln", 0): "ok", ("bn", 0): "ok", ("absurd_lr", 0): "diverged", ("broken", 0): "error",
        ("ln", 1): "ok", ("bn", 1): "ok", ("absurd_lr", 1): "diverged", ("broken", 1): "error",
    }
    assert "exceeds the limit" in status[("absurd_lr", 0)]["message"] or "not finite" in status[("absurd_lr", 0)][
        "message"]
    assert status[("absurd_lr", 0)]["step"] < cfg.steps
    assert "ValueError" in status[("broken", 1)]["message"] and "num_groups" in status[("broken", 1)]["message"]
    ln = [r for r in rows if r["arm"] == "ln" and r["seed"] == 0]
    val = {r["step"]: r["value"] for r in ln if r["metric"] == "val_loss"}
    assert val[0] > val[20] and math.isfinite(val[20])  # it learns
    assert {r["metric"] for r in ln if r["kind"] == "train"} == {"train_loss", "grad_norm", "lr", "throughput"}
    assert all(r["unit"] == "tokens/s" for r in ln if r["metric"] == "throughput")
    diag = [r for r in ln if r["kind"] == "diag"]
    assert {r["step"] for r in diag} == {0, 12, 20}
    assert {r["layer"] for r in diag if r["metric"] == "hidden_variance:all_elements"} == {0, 1, 2}


def test_env_json_records_the_run(tiny_run: tuple[Path, Any]) -> None:
    run_dir, cfg = tiny_run
    env = json.loads((run_dir / "env.json").read_text())
    assert env["command"] == ["normlab", "lab", "--test"]
    assert env["seeds"] == [0, 1] and env["world_size"] == 1
    assert parse_suite(env["config"]) == cfg
    assert {"torch", "python", "git_sha", "normlab"} <= set(env["env"])
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "finish"]


def test_env_json_records_every_arms_full_resolved_config(tiny_run: tuple[Path, Any]) -> None:
    run_dir, cfg = tiny_run
    env = json.loads((run_dir / "env.json").read_text())
    arms = env["arms"]
    assert sorted(arms) == sorted(a.name for a in cfg.arms)
    ln = arms["ln"]["model"]
    # defaults the suite never wrote are recorded too
    assert ln["d_model"] == 32 and ln["mlp_ratio"] == 4.0 and ln["placement"] == "pre" and ln["norm"] == "layer_norm"
    assert arms["absurd_lr"]["train"]["lr"] == 1e4 and arms["ln"]["train"]["lr"] == cfg.lr
    assert {"scikit-learn", "matplotlib"} <= set(env["env"])  # installed here, so recorded


def test_schedule_references_are_recorded_resolved(tmp_path: Path, tiny: dict[str, Any]) -> None:
    tiny.update(steps=4, eval_every=2, warmup_steps="0.25*steps", seeds=[0], diagnostics_at=[0, "steps"])
    tiny["arms"] = [{"name": "pn", "norm": "power_norm", "norm_kwargs": {"warmup_iters": "warmup_steps"}},
                    {"name": "prep", "norm": "prep_batch_norm", "norm_kwargs": {"total_steps": "0.75*steps"}}]
    cfg = parse_suite(tiny)
    result = run_suite(cfg, tmp_path / "run", progress=False)
    assert set(result.statuses.values()) == {"ok"}
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["arms"]["pn"]["model"]["norm_kwargs"] == {"warmup_iters": 1}  # the warm-up's own reference first
    assert env["arms"]["pn"]["train"]["warmup_steps"] == 1 and env["config"]["warmup_steps"] == "0.25*steps"
    assert env["arms"]["prep"]["model"]["norm_kwargs"] == {"total_steps": 3}
    assert env["config"]["arms"][1]["norm_kwargs"] == {"total_steps": "0.75*steps"}  # as written, for --resume
    rows = _check_complete(tmp_path / "run", cfg)
    assert {r["step"] for r in rows if r["kind"] == "diag"} == {0, 4}  # "steps" resolved to the last step
    lrs = {r["step"]: r["value"] for r in rows if r["metric"] == "lr" and r["arm"] == "pn"}
    assert lrs[2] == pytest.approx(lr_at(1, 4, cfg.lr, 1, cfg.min_lr_ratio))  # trained with the resolved warm-up


def test_new_run_dir_claims_a_fresh_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime as dt

    import normlab.lab.rundir as rundir

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Frozen:  # type: ignore[override]
            return cls(2025, 1, 2, 3, 4, 5)

    monkeypatch.setattr(rundir._dt, "datetime", Frozen)
    base = tmp_path / "runs"
    claimed = [rundir.new_run_dir("s", base) for _ in range(3)]  # three invocations in the same second
    assert [p.name for p in claimed] == ["s-20250102-030405", "s-20250102-030405-2", "s-20250102-030405-3"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in claimed)  # created: no one else can take them


def test_env_json_is_never_overwritten(tmp_path: Path, tiny: dict[str, Any]) -> None:
    from normlab.lab.dist import DistInfo
    from normlab.lab.rundir import write_env

    cfg = parse_suite(tiny)
    (tmp_path / "env.json").write_text("{}")
    with pytest.raises(FileExistsError):
        write_env(tmp_path, cfg, ["normlab"], DistInfo())
    assert (tmp_path / "env.json").read_text() == "{}"


def test_env_json_is_complete_or_absent(tmp_path: Path, tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import normlab._io as io_mod
    from normlab.lab.dist import DistInfo
    from normlab.lab.rundir import write_env

    cfg = parse_suite(tiny)
    real_fsync = os.fsync

    def killed_before_sync(fd: int) -> None:  # the JSON is written but not yet durable: the process "dies" here
        raise _Interrupt

    monkeypatch.setattr(io_mod.os, "fsync", killed_before_sync)
    with pytest.raises(_Interrupt):
        write_env(tmp_path, cfg, ["normlab"], DistInfo())
    assert not (tmp_path / "env.json").exists()  # nothing under its name before the write is complete
    assert list(tmp_path.iterdir()) == []  # and the temporary file is gone
    monkeypatch.setattr(io_mod.os, "fsync", real_fsync)
    write_env(tmp_path, cfg, ["normlab"], DistInfo())
    assert json.loads((tmp_path / "env.json").read_text())["config"] == cfg.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["env.json"]
    before = (tmp_path / "env.json").read_text()
    with pytest.raises(FileExistsError, match=r"env.json exists and is never overwritten"):
        write_env(tmp_path, cfg, ["other"], DistInfo())
    assert (tmp_path / "env.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["env.json"]


def test_resume_records_its_environment_and_warns_on_a_changed_sha(tmp_path: Path, tiny: dict[str, Any]) -> None:
    import io

    tiny.update(steps=2, eval_every=1, warmup_steps=0, seeds=[0], diagnostics_at=[], arms=tiny["arms"][:1])
    cfg = parse_suite(tiny)
    run_dir = tmp_path / "run"
    run_suite(cfg, run_dir, progress=False)
    env_path = run_dir / "env.json"
    env = json.loads(env_path.read_text())
    env["env"]["git_sha"] = "0" * 40  # as if started from another commit
    env_path.write_text(json.dumps(env))
    err = io.StringIO()
    run_suite(cfg, run_dir, resume=True, progress=False, stream=err)
    assert re.search(r"warning: resuming .* with git SHA .* but it was started with 0{40}", err.getvalue())
    resume = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()][2]
    assert resume["event"] == "resume" and resume["dropped_rows"] == 0
    assert {"torch", "python", "git_sha"} <= set(resume["env"])
    env["env"]["git_sha"] = resume["env"]["git_sha"]
    env_path.write_text(json.dumps(env))
    err = io.StringIO()
    run_suite(cfg, run_dir, resume=True, progress=False, stream=err)
    assert "warning" not in err.getvalue()


def test_refuses_a_non_empty_directory(tiny_run: tuple[Path, Any]) -> None:
    run_dir, cfg = tiny_run
    with pytest.raises(FileExistsError, match="use --resume"):
        run_suite(cfg, run_dir, progress=False)


class _Interrupt(BaseException):
    """Stands in for a kill: a BaseException is not caught as an arm error."""


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path: Path, tiny: dict[str, Any]) -> None:
    tiny["arms"] = tiny["arms"][:1]
    tiny["seeds"] = [0]
    cfg = parse_suite(tiny)
    run_suite(cfg, tmp_path / "ref", progress=False)
    reference = {row_key(r): r["value"] for r in _rows(tmp_path / "ref") if r["kind"] != "status"}

    def interrupt(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        if interrupt.calls == 1:  # type: ignore[attr-defined]  # 0: step 0, 1: step 12
            raise _Interrupt
        interrupt.calls += 1  # type: ignore[attr-defined]
        return []

    interrupt.calls = 0  # type: ignore[attr-defined]
    from normlab.lab.runner import collect_hook

    with pytest.raises(_Interrupt):  # dies at the diagnostics of step 12: checkpoint at 10
        run_suite(cfg, tmp_path / "run", progress=False, hooks=[collect_hook(cfg.diagnostics), interrupt])
    path = tmp_path / "run" / "rows.jsonl"
    # rows written after the checkpoint (as a kill between write and checkpoint leaves them) and a torn line
    extra = {"schema": 1, "arm": "ln", "seed": 0, "step": 15, "kind": "eval", "metric": "val_loss", "value": 9.0,
             "layer": None}
    with open(path, "a") as f:
        f.write(json.dumps(extra) + "\n" + '{"schema": 1, "arm": "ln", "se')
    assert (tmp_path / "run" / "ckpt" / "ln__seed0.pt").exists()
    result = run_suite(cfg, tmp_path / "run", resume=True, progress=False)
    assert result.dropped_rows == 1
    rows = _check_complete(tmp_path / "run", cfg)
    resumed = {row_key(r): r["value"] for r in rows if r["kind"] != "status"}
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        if key[4] in ("throughput",):
            continue
        assert resumed[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    events = [json.loads(line)["event"] for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert events == ["start", "resume", "finish"]


def test_ddp_code_path_world_size_one(tmp_path: Path, tiny: dict[str, Any]) -> None:
    tiny["arms"] = tiny["arms"][1:]  # batch_norm: buffers broadcast by DDP
    tiny["seeds"] = [0]
    tiny["steps"] = 10
    tiny["diagnostics_at"] = []
    cfg = parse_suite(tiny)
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        info = init_distributed()
        assert info.enabled and info.world_size == 1 and info.is_main
        result = run_suite(cfg, tmp_path / "ddp", progress=False, dist=info)
    finally:
        torch_dist.destroy_process_group()
    assert result.statuses == {("bn", 0): "ok"}
    _check_complete(tmp_path / "ddp", cfg)


@pytest.mark.parametrize("impl", ["auto", "composite"])
def test_arms_run_their_norms_under_the_suites_impl(
    tmp_path: Path, tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    import normlab.nn.rms_norm as rms_module
    from normlab.kernels import current_impl

    seen: list[str] = []
    forward = rms_module.RMSNorm.forward

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(current_impl())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(rms_module.RMSNorm, "forward", spy)
    tiny.update(steps=2, eval_every=2, warmup_steps=1, seeds=[0], diagnostics_at=[], impl=impl)
    tiny["arms"] = [{"name": "rms", "norm": "rms_norm"}]
    cfg = parse_suite(tiny)
    result = run_suite(cfg, tmp_path / "run", progress=False)
    assert set(result.statuses.values()) == {"ok"}
    assert seen and set(seen) == {impl}  # training and evaluation steps alike
    assert json.loads((tmp_path / "run" / "env.json").read_text())["config"]["impl"] == impl


def test_an_unknown_impl_is_refused_by_name(tiny: dict[str, Any]) -> None:
    from normlab.lab.config import SuiteError

    tiny["impl"] = "fast"
    with pytest.raises(SuiteError, match=r"impl: expected one of \['auto', 'composite', 'cpu', 'triton'\].*'fast'"):
        parse_suite(tiny)
