"""The lab runner: every (seed, arm) of a suite, trained and evaluated, with rows on disk and resumable checkpoints.

Responsibilities are split: :mod:`normlab.lab.rundir` owns the run directory (lock, ``env.json``, events,
checkpoints, preparing a resume), :mod:`normlab.lab.training` the training loop of one arm, and this module the
sweep over them, including the hand-off between the DDP ranks.

On ``--resume`` each unfinished run keeps its rows up to its checkpoint and continues from it; without a checkpoint
it starts over (see :mod:`normlab.lab.training` for why that loses at most one eval interval and never duplicates a
row).

Order: seeds outer, arms inner, so that a partial run holds comparable arms and slow drift of a shared machine
spreads over arms evenly.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from normlab.lab.config import SuiteConfig
from normlab.lab.dist import DistInfo, barrier, broadcast_object
from normlab.lab.progress import ProgressBar
from normlab.lab.rundir import (
    NotARunDir,
    RunDirLocked,
    RunDirNotEmpty,
    RunProgress,
    append_event,
    checkpoint_path,
    is_unused_run_dir,
    load_run_config,
    new_run_dir,
    open_run_dir,
)
from normlab.lab.schedule import lr_at
from normlab.lab.schema import ROWS_FILE, RowLog
from normlab.lab.tasks import make_task
from normlab.lab.training import ArmRun, DiagnosticHook, collect_hook, train_arm

__all__ = [
    "DiagnosticHook",
    "NotARunDir",
    "RunDirLocked",
    "RunDirNotEmpty",
    "RunResult",
    "collect_hook",
    "is_unused_run_dir",
    "load_run_config",
    "lr_at",
    "new_run_dir",
    "run_suite",
]


@dataclass
class RunResult:
    """What :func:`run_suite` did: the run directory and the status of every ``(arm, seed)``."""

    run_dir: Path
    statuses: dict[tuple[str, int], str] = field(default_factory=dict)
    dropped_rows: int = 0


def run_suite(
    cfg: SuiteConfig,
    run_dir: str | Path,
    *,
    argv: Sequence[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    hooks: Sequence[DiagnosticHook] | None = None,
    dist: DistInfo | None = None,
    stream: TextIO | None = None,
) -> RunResult:
    """Run every ``(seed, arm)`` of ``cfg`` into ``run_dir``.

    Args:
        cfg: a validated suite.
        run_dir: the run directory; for a new run it must not exist or be empty.
        argv: command line recorded in ``env.json`` (default ``sys.argv``).
        resume: continue the run in ``run_dir`` (see the module docstring).
        progress: draw a progress bar on ``stream``.
        hooks: diagnostics hooks ``hook(model, batch) -> rows`` called at ``cfg.diagnostics_at``; default one
            :func:`collect_hook` of ``cfg.diagnostics`` (none when that is empty).
        dist: the DDP context (default: single process).
        stream: progress and error stream (default ``sys.stderr``).

    Raises:
        RunDirNotEmpty: a new run into a directory in use (a ``FileExistsError``).
        NotARunDir: ``resume`` of a directory without ``env.json`` (a ``FileNotFoundError``).
        RunDirLocked: another process is running or resuming ``run_dir``.
    """
    dist = dist or DistInfo()
    stream = stream if stream is not None else sys.stderr
    run_dir = Path(run_dir)
    lock_box: list[TextIO | None] = [None]  # rank 0's lock on run_dir, held until the suite is done
    try:
        state = _open_on_rank0(cfg, run_dir, argv, resume, dist, stream, lock_box)
        if hooks is None:
            hooks = [collect_hook(cfg.diagnostics)] if cfg.diagnostics and cfg.diagnostics_at else []
        return _sweep(cfg, run_dir, state, progress, hooks, dist, stream)
    finally:
        if lock_box[0] is not None:
            lock_box[0].close()


def _open_on_rank0(
    cfg: SuiteConfig, run_dir: Path, argv: Sequence[str] | None, resume: bool, dist: DistInfo, stream: TextIO,
    lock_box: list[TextIO | None],
) -> RunProgress:
    """Rank 0 opens the run directory and tells the other ranks what it holds, or that it failed: they would
    otherwise wait forever for a run that never starts."""
    state = RunProgress()
    failure: BaseException | None = None
    if dist.is_main:
        try:
            state = open_run_dir(cfg, run_dir, argv, resume, dist, stream, lock_box)
        except Exception as exc:  # re-raised below, after telling the other ranks
            failure = exc
    done, ckpt_steps, message = broadcast_object(
        (state.done, state.ckpt_steps, None if failure is None else str(failure)), dist
    )
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f"rank 0 could not start the run: {message}")
    barrier(dist)
    return RunProgress(done, ckpt_steps, state.dropped)


def _sweep(
    cfg: SuiteConfig, run_dir: Path, state: RunProgress, progress: bool, hooks: Sequence[DiagnosticHook],
    dist: DistInfo, stream: TextIO,
) -> RunResult:
    """Train every unfinished ``(arm, seed)``, seeds outer, then record the finish."""
    task = make_task(cfg, dist, dist.device())
    log = RowLog(run_dir / ROWS_FILE, enabled=dist.is_main)
    runs = [(arm, seed) for seed in cfg.seeds for arm in cfg.arms]
    initial = sum(cfg.steps if (a.name, s) in state.done else state.ckpt_steps.get((a.name, s), 0) for a, s in runs)
    bar = ProgressBar(len(runs) * cfg.steps, initial=initial, stream=stream, enabled=progress and dist.is_main)
    result = RunResult(run_dir=run_dir, dropped_rows=state.dropped)
    for arm, seed in runs:
        if (arm.name, seed) in state.done:
            continue
        ckpt = checkpoint_path(run_dir, arm.name, seed)
        status = train_arm(ArmRun(cfg, arm, seed, task, log, ckpt, bar, hooks, dist, stream))
        result.statuses[(arm.name, seed)] = status
    bar.close()
    if dist.is_main:
        append_event(run_dir, {"event": "finish"})
    barrier(dist)
    return result
