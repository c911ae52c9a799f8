"""The run directory: claiming and locking it, ``env.json``, the event log, checkpoints, and preparing a resume.

Files (see :mod:`normlab.lab.schema` for the rows):

* ``env.json``: versions, git SHA, command line, the suite config as given (``config``), every arm's full resolved
  model config and training settings (``arms``: defaults filled in, schedule references resolved to ints) and seeds;
  written once at the start, atomically and exclusively (:func:`normlab._io.atomic_write`: complete or absent, and
  never over an existing one).
* ``.lock``: held (``fcntl.flock``) by the process running or resuming the directory, so that a second
  ``normlab lab --resume`` of the same directory fails at once instead of interleaving rows.
* ``rows.jsonl``: append-only rows, flushed and fsynced at every write.
* ``events.jsonl``: one line per start / resume / finish of the process; a resume records the rows it dropped and
  the environment of the resuming process (a changed git SHA is also warned about on stderr).
* ``ckpt/<arm>__seed<k>.pt``: the latest checkpoint of an unfinished arm (atomic: fsynced temporary file +
  ``os.replace``), deleted when the arm's status row is written.

Only rank 0 of a DDP job calls the functions that write here.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from normlab._env import collect_env
from normlab._io import append_jsonl, atomic_write, atomic_write_json, remove_temp_files, temp_name_of
from normlab.lab.config import SuiteConfig, model_config_class, parse_suite
from normlab.lab.dist import DistInfo
from normlab.lab.schema import ROWS_FILE, read_rows, rewrite_rows

__all__ = [
    "ENV_FILE",
    "EVENTS_FILE",
    "LOCK_FILE",
    "NotARunDir",
    "RunDirLocked",
    "RunDirNotEmpty",
    "RunProgress",
    "append_event",
    "checkpoint_path",
    "is_unused_run_dir",
    "load_checkpoint",
    "load_run_config",
    "lock_run_dir",
    "new_run_dir",
    "open_run_dir",
    "resolved_arms",
    "save_checkpoint",
    "write_env",
]

LOCK_FILE = ".lock"
ENV_FILE = "env.json"
EVENTS_FILE = "events.jsonl"


class RunDirLocked(RuntimeError):
    """Another process holds the run directory's ``.lock`` (it is running or resuming that directory)."""


class RunDirNotEmpty(FileExistsError):
    """A new run into a directory that is in use (see :func:`is_unused_run_dir`)."""


class NotARunDir(FileNotFoundError):
    """``resume`` of a directory without ``env.json``."""


@dataclass
class RunProgress:
    """What a run directory already holds: the finished ``(arm, seed)`` runs, the checkpoint step of each unfinished
    one that has a checkpoint, and the rows a resume dropped (those written after the checkpoints)."""

    done: set[tuple[str, int]] = field(default_factory=set)
    ckpt_steps: dict[tuple[str, int], int] = field(default_factory=dict)
    dropped: int = 0


def new_run_dir(suite_name: str, base: str | Path = "runs") -> Path:
    """Create and return ``<base>/<suite>-<YYYYmmdd-HHMMSS>`` (with ``-2``, ``-3``... if taken): a fresh, empty
    directory per invocation. The directory is claimed with an exclusive ``mkdir``, so two invocations started in
    the same second never share one."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(base) / f"{suite_name}-{stamp}"
    root.parent.mkdir(parents=True, exist_ok=True)
    path, k = root, 1
    while True:
        try:
            path.mkdir(exist_ok=False)
            return path
        except FileExistsError:
            k += 1
            path = Path(f"{root}-{k}")


def _is_start_leftover(name: str) -> bool:
    """A file that a start which failed or was killed before writing ``env.json`` leaves behind: the ``.lock`` and
    the temporary files of the ``env.json`` write."""
    return name == LOCK_FILE or temp_name_of(Path(ENV_FILE), name)


def is_unused_run_dir(run_dir: str | Path) -> bool:
    """Whether a new run may start in ``run_dir``: it does not exist, or holds nothing but what a failed start
    leaves (the ``.lock`` and temporary ``env.json`` files). Such a directory cannot be resumed (it has no
    ``env.json``), so refusing it too would leave it unusable. ``normlab lab --out`` and
    :func:`~normlab.lab.runner.run_suite` both decide with this function."""
    run_dir = Path(run_dir)
    return not run_dir.exists() or all(_is_start_leftover(p.name) for p in run_dir.iterdir())


def lock_run_dir(run_dir: Path) -> TextIO | None:
    """Take ``run_dir/.lock`` exclusively without waiting; the lock lasts until the returned file is closed (or the
    process dies: the kernel drops ``flock`` locks with the process, so a ``kill -9`` leaves no stale lock).

    Raises:
        RunDirLocked: another process holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        return None
    f = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")  # held open (locked) for the whole run
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        f.close()
        raise RunDirLocked(
            f"run directory {run_dir} is in use by another normlab lab process (it holds {run_dir / LOCK_FILE}); "
            "wait for it to finish, or stop it before resuming"
        ) from exc
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")  # for a person looking at it; the flock is what counts
    f.flush()
    return f


def checkpoint_path(run_dir: Path, arm: str, seed: int) -> Path:
    return run_dir / "ckpt" / f"{arm}__seed{seed}.pt"


def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically: a kill leaves the previous checkpoint or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    return dict(torch.load(path, map_location=device, weights_only=False))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def append_event(run_dir: Path, event: dict[str, Any]) -> None:
    """Append one event (``time`` added when missing) to ``events.jsonl``, fsynced."""
    append_jsonl(run_dir / EVENTS_FILE, [{"time": _now(), **event}])


def load_run_config(run_dir: Path) -> SuiteConfig:
    """The resolved suite config stored in ``run_dir/env.json`` (what ``--resume`` and the report use)."""
    env_path = Path(run_dir) / ENV_FILE
    if not env_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a lab run directory: {env_path} is missing")
    env = json.loads(env_path.read_text(encoding="utf-8"))
    return parse_suite(env["config"], origin=str(env_path))


def resolved_arms(cfg: SuiteConfig) -> dict[str, dict[str, Any]]:
    """Every arm's full model config (defaults filled in, schedule references resolved) and training settings."""
    cls = model_config_class(cfg.task)
    out = {}
    for arm in cfg.arms:
        model = dataclasses.asdict(cls.from_dict(cfg.arm_model(arm)))
        out[arm.name] = {"model": model, "train": cfg.arm_train(arm), "schedule": cfg.arm_schedule(arm)}
    return out


def write_env(run_dir: Path, cfg: SuiteConfig, argv: Sequence[str] | None, dist: DistInfo) -> None:
    """Write ``env.json`` (see the module docstring).

    Complete or absent, never torn: a kill -9 in the middle of an in-place write would leave a truncated env.json,
    and the directory could then neither be resumed (broken JSON) nor reused (not empty). The exclusive atomic write
    also never overwrites an existing env.json (``FileExistsError``). A temporary file left by a kill does not make
    the directory used (:func:`is_unused_run_dir`) and the next start removes it.
    """
    env = {
        "schema": 1,
        "suite": cfg.name,
        "created": _now(),
        "command": list(sys.argv if argv is None else argv),
        "cwd": os.getcwd(),
        "world_size": dist.world_size,
        "seeds": list(cfg.seeds),
        "config": cfg.to_dict(),
        "arms": resolved_arms(cfg),
        "env": collect_env(),
    }
    atomic_write_json(run_dir / ENV_FILE, env, exclusive=True)


def _resume_event(run_dir: Path, argv: Sequence[str] | None, dropped: int, dist: DistInfo, stream: TextIO) -> None:
    """Append the resume event with this process's environment; warn when the code changed since the start."""
    env = collect_env()
    original = json.loads((run_dir / ENV_FILE).read_text(encoding="utf-8")).get("env", {})
    if original.get("git_sha") != env.get("git_sha"):
        stream.write(
            f"[normlab lab] warning: resuming {run_dir} with git SHA {env.get('git_sha')} but it was started with "
            f"{original.get('git_sha')}; the finished and the resumed parts ran different code\n"
        )
        stream.flush()
    append_event(run_dir, {"event": "resume", "argv": list(sys.argv if argv is None else argv),
                           "dropped_rows": dropped, "world_size": dist.world_size, "env": env})


def _prepare_resume(run_dir: Path, cfg: SuiteConfig) -> RunProgress:
    """Finished runs, checkpoint steps of unfinished ones, and ``rows.jsonl`` cut back to the checkpoints.

    Each unfinished run keeps its rows with ``step <= S_ckpt`` (all of them were written before that checkpoint)
    and drops the rest (and a torn last line) in one atomic rewrite.
    """
    rows, _ = read_rows(run_dir / ROWS_FILE)
    progress = RunProgress(done={(r["arm"], r["seed"]) for r in rows if r.get("kind") == "status"})
    for arm in cfg.arms:
        for seed in cfg.seeds:
            path = checkpoint_path(run_dir, arm.name, seed)
            remove_temp_files(path)  # of a checkpoint write that was killed
            if (arm.name, seed) in progress.done:
                path.unlink(missing_ok=True)
            elif path.exists():
                progress.ckpt_steps[(arm.name, seed)] = int(load_checkpoint(path)["state"]["step"])

    def keep(row: dict[str, Any]) -> bool:
        key = (row["arm"], row["seed"])
        return key in progress.done or row["step"] <= progress.ckpt_steps.get(key, -1)

    progress.dropped = rewrite_rows(run_dir / ROWS_FILE, keep)
    return progress


def _not_empty(run_dir: Path) -> RunDirNotEmpty:
    return RunDirNotEmpty(f"run directory {run_dir} exists and is not empty; use --resume to continue it")


def open_run_dir(
    cfg: SuiteConfig, run_dir: Path, argv: Sequence[str] | None, resume: bool, dist: DistInfo, stream: TextIO,
    lock_box: list[TextIO | None],
) -> RunProgress:
    """Rank 0: lock ``run_dir`` (the lock goes into ``lock_box`` for the caller to close), then prepare the resume
    or start the new run (``env.json`` and the start event).

    Raises:
        RunDirNotEmpty: a new run into a directory in use (a ``FileExistsError``).
        NotARunDir: ``resume`` of a directory without ``env.json`` (a ``FileNotFoundError``).
        RunDirLocked: another process is running or resuming ``run_dir``.
    """
    if resume:
        if not (run_dir / ENV_FILE).is_file():
            raise NotARunDir(f"--resume: {run_dir} is not a lab run directory (no env.json)")
        lock_box[0] = lock_run_dir(run_dir)
        progress = _prepare_resume(run_dir, cfg)
        _resume_event(run_dir, argv, progress.dropped, dist, stream)
        return progress
    if not is_unused_run_dir(run_dir):
        raise _not_empty(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_box[0] = lock_run_dir(run_dir)
    if not is_unused_run_dir(run_dir):  # another process got here between the check and the lock
        raise _not_empty(run_dir)
    remove_temp_files(run_dir / ENV_FILE)  # of a start that was killed while writing it (we hold the lock)
    write_env(run_dir, cfg, argv, dist)
    append_event(run_dir, {"event": "start", "world_size": dist.world_size})
    return RunProgress()
