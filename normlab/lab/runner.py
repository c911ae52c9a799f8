"""The lab runner: every (seed, arm) of a suite, trained and evaluated, with rows on disk and resumable checkpoints.

Files of a run directory (see :mod:`normlab.lab.schema` for the rows):

* ``env.json``: versions, git SHA, command line, the suite config as given (``config``), every arm's full resolved
  model config and training settings (``arms``: defaults filled in, schedule references resolved to ints) and seeds;
  written once at the start, atomically (a fsynced temporary file hard-linked to its name: complete or absent, and
  never over an existing one).
* ``.lock``: held (``fcntl.flock``) by the process running or resuming the directory, so that a second
  ``normlab lab --resume`` of the same directory fails at once instead of interleaving rows.
* ``rows.jsonl``: append-only rows, flushed and fsynced at every write.
* ``events.jsonl``: one line per start / resume / finish of the process; a resume records the rows it dropped and
  the environment of the resuming process (a changed git SHA is also warned about on stderr).
* ``ckpt/<arm>__seed<k>.pt``: the latest checkpoint of an unfinished arm (atomic: temporary file + ``os.replace``),
  deleted when the arm's status row is written.

Crash safety. At every eval step ``S`` the rows of ``S`` are written *before* the checkpoint of ``S``. A run is
finished exactly when its status row exists. On ``--resume`` each unfinished run keeps its rows with
``step <= S_ckpt`` (all of them were written before that checkpoint) and drops the rest (and a torn last line) in one
atomic rewrite, then continues from ``S_ckpt``; without a checkpoint it starts over. So a ``kill -9`` loses at most one
eval interval and never duplicates a row. The data stream is a function of ``(seed, rank, step)``, so a resumed arm
draws the same batches as an uninterrupted one.

Order: seeds outer, arms inner, so that a partial run holds comparable arms and slow drift of a shared machine
spreads over arms evenly.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import Tensor, nn

from normlab.data._cache import atomic_write_text, temp_name_of
from normlab.lab.config import ArmConfig, SuiteConfig, model_config_class, parse_suite
from normlab.lab.dist import DistInfo, all_reduce_sum, barrier, broadcast_object
from normlab.lab.progress import ProgressBar
from normlab.lab.schema import ROWS_FILE, RowLog, make_row, read_rows, rewrite_rows
from normlab.lab.tasks import Task, make_task

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

DiagnosticHook = Callable[[nn.Module, dict[str, Tensor]], list[dict[str, Any]]]


@dataclass
class RunResult:
    """What :func:`run_suite` did: the run directory and the status of every ``(arm, seed)``."""

    run_dir: Path
    statuses: dict[tuple[str, int], str] = field(default_factory=dict)
    dropped_rows: int = 0


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps, then cosine decay to
    ``min_ratio * peak`` at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak * (min_ratio + (1.0 - min_ratio) * cosine)


def _diag_metric(row: dict[str, Any]) -> str:
    name = str(row["metric"])
    if row.get("variant"):
        name += f":{row['variant']}"
    if row.get("gap") not in (None, 1):
        name += f":gap{row['gap']}"
    return name


def collect_hook(metrics: Sequence[str]) -> DiagnosticHook:
    """A diagnostics hook running :func:`normlab.diagnostics.collect`; per-head rows are left out (the head-pooled
    row stays) and ``variant``/``gap`` are folded into the metric name so each (metric, layer) is one row."""
    from normlab.diagnostics import collect

    def hook(model: nn.Module, batch: dict[str, Tensor]) -> list[dict[str, Any]]:
        rows = collect(model, batch, list(metrics))
        return [
            {"metric": _diag_metric(r), "layer": r.get("layer"), "value": r["value"]}
            for r in rows
            if r.get("head") is None and isinstance(r.get("value"), (int, float))
        ]

    return hook


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


class RunDirLocked(RuntimeError):
    """Another process holds the run directory's ``.lock`` (it is running or resuming that directory)."""


class RunDirNotEmpty(FileExistsError):
    """A new run into a directory that is in use (see :func:`is_unused_run_dir`)."""


class NotARunDir(FileNotFoundError):
    """``resume`` of a directory without ``env.json``."""


LOCK_FILE = ".lock"
ENV_FILE = "env.json"


def _is_start_leftover(name: str) -> bool:
    """A file that a start which failed or was killed before writing ``env.json`` leaves behind: the ``.lock`` and
    the temporary files of the ``env.json`` write."""
    return name == LOCK_FILE or temp_name_of(Path(ENV_FILE), name)


def is_unused_run_dir(run_dir: str | Path) -> bool:
    """Whether a new run may start in ``run_dir``: it does not exist, or holds nothing but what a failed start
    leaves (the ``.lock`` and temporary ``env.json`` files). Such a directory cannot be resumed (it has no
    ``env.json``), so refusing it too would leave it unusable. ``normlab lab --out`` and :func:`run_suite` both
    decide with this function."""
    run_dir = Path(run_dir)
    return not run_dir.exists() or all(_is_start_leftover(p.name) for p in run_dir.iterdir())


def _lock_run_dir(run_dir: Path) -> TextIO | None:
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


def _ckpt_path(run_dir: Path, arm: str, seed: int) -> Path:
    return run_dir / "ckpt" / f"{arm}__seed{seed}.pt"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append_event(run_dir: Path, event: dict[str, Any]) -> None:
    with open(run_dir / "events.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(event, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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


def _write_env(run_dir: Path, cfg: SuiteConfig, argv: Sequence[str] | None, dist: DistInfo) -> None:
    from normlab.cli.env import collect_env

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
    # Complete or absent, never torn: a kill -9 in the middle of an in-place write would leave a truncated env.json,
    # and the directory could then neither be resumed (broken JSON) nor reused (not empty). The exclusive atomic write
    # also never overwrites an existing env.json. A temporary file left by a kill does not make the directory used
    # (is_unused_run_dir) and the next start removes it.
    atomic_write_text(run_dir / ENV_FILE, json.dumps(env, indent=2, sort_keys=True, default=str) + "\n", exclusive=True)


def _resume_event(run_dir: Path, argv: Sequence[str] | None, dropped: int, dist: DistInfo, stream: TextIO) -> None:
    """Append the resume event with this process's environment; warn when the code changed since the start."""
    from normlab.cli.env import collect_env

    env = collect_env()
    original = json.loads((run_dir / ENV_FILE).read_text(encoding="utf-8")).get("env", {})
    if original.get("git_sha") != env.get("git_sha"):
        stream.write(
            f"[normlab lab] warning: resuming {run_dir} with git SHA {env.get('git_sha')} but it was started with "
            f"{original.get('git_sha')}; the finished and the resumed parts ran different code\n"
        )
        stream.flush()
    _append_event(run_dir, {"event": "resume", "time": _now(), "argv": list(sys.argv if argv is None else argv),
                            "dropped_rows": dropped, "world_size": dist.world_size, "env": env})


def _prepare_resume(run_dir: Path, cfg: SuiteConfig) -> tuple[set[tuple[str, int]], dict[tuple[str, int], int], int]:
    """Rank 0: finished runs, checkpoint steps of unfinished ones, and the rows dropped from ``rows.jsonl``."""
    rows, _ = read_rows(run_dir / ROWS_FILE)
    done = {(r["arm"], r["seed"]) for r in rows if r.get("kind") == "status"}
    ckpt_steps: dict[tuple[str, int], int] = {}
    for arm in cfg.arms:
        for seed in cfg.seeds:
            path = _ckpt_path(run_dir, arm.name, seed)
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)
            if (arm.name, seed) in done:
                path.unlink(missing_ok=True)
            elif path.exists():
                saved = torch.load(path, map_location="cpu", weights_only=False)
                ckpt_steps[(arm.name, seed)] = int(saved["state"]["step"])

    def keep(row: dict[str, Any]) -> bool:
        key = (row["arm"], row["seed"])
        return key in done or row["step"] <= ckpt_steps.get(key, -1)

    dropped = rewrite_rows(run_dir / ROWS_FILE, keep)
    return done, ckpt_steps, dropped


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
        return _run_suite_locked(cfg, run_dir, argv, resume, progress, hooks, dist, stream, lock_box)
    finally:
        if lock_box[0] is not None:
            lock_box[0].close()


_Progress = tuple[set[tuple[str, int]], dict[tuple[str, int], int], int]  # done, checkpoint steps, dropped rows


def _setup(cfg: SuiteConfig, run_dir: Path, argv: Sequence[str] | None, resume: bool, dist: DistInfo,
           stream: TextIO, lock_box: list[TextIO | None]) -> _Progress:
    """Rank 0: lock the run directory, then prepare the resume or start the new run."""

    if resume:
        if not (run_dir / ENV_FILE).is_file():
            raise NotARunDir(f"--resume: {run_dir} is not a lab run directory (no env.json)")
        lock_box[0] = _lock_run_dir(run_dir)
        done, ckpt_steps, dropped = _prepare_resume(run_dir, cfg)
        _resume_event(run_dir, argv, dropped, dist, stream)
        return done, ckpt_steps, dropped
    if not is_unused_run_dir(run_dir):
        raise RunDirNotEmpty(f"run directory {run_dir} exists and is not empty; use --resume to continue it")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_box[0] = _lock_run_dir(run_dir)
    if not is_unused_run_dir(run_dir):  # another process got here between the check and the lock
        raise RunDirNotEmpty(f"run directory {run_dir} exists and is not empty; use --resume to continue it")
    for leftover in run_dir.iterdir():  # temporary env.json files of a start that was killed (we hold the lock)
        if leftover.name != LOCK_FILE and _is_start_leftover(leftover.name):
            leftover.unlink(missing_ok=True)
    _write_env(run_dir, cfg, argv, dist)
    _append_event(run_dir, {"event": "start", "time": _now(), "world_size": dist.world_size})
    return set(), {}, 0


def _run_suite_locked(
    cfg: SuiteConfig,
    run_dir: Path,
    argv: Sequence[str] | None,
    resume: bool,
    progress: bool,
    hooks: Sequence[DiagnosticHook] | None,
    dist: DistInfo,
    stream: TextIO,
    lock_box: list[TextIO | None],
) -> RunResult:
    done: set[tuple[str, int]] = set()
    ckpt_steps: dict[tuple[str, int], int] = {}
    dropped = 0
    failure: BaseException | None = None
    if dist.is_main:
        try:
            done, ckpt_steps, dropped = _setup(cfg, run_dir, argv, resume, dist, stream, lock_box)
        except Exception as exc:  # re-raised below, after telling the other ranks, which would wait forever
            failure = exc
    done, ckpt_steps, message = broadcast_object((done, ckpt_steps, None if failure is None else str(failure)), dist)
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f"rank 0 could not start the run: {message}")
    barrier(dist)

    if hooks is None:
        hooks = [collect_hook(cfg.diagnostics)] if cfg.diagnostics and cfg.diagnostics_at else []
    device = dist.device()
    task = make_task(cfg, dist, device)
    log = RowLog(run_dir / ROWS_FILE, enabled=dist.is_main)
    runs = [(arm, seed) for seed in cfg.seeds for arm in cfg.arms]
    initial = sum(cfg.steps if (a.name, s) in done else ckpt_steps.get((a.name, s), 0) for a, s in runs)
    bar = ProgressBar(len(runs) * cfg.steps, initial=initial, stream=stream, enabled=progress and dist.is_main)
    result = RunResult(run_dir=run_dir, dropped_rows=dropped)
    for arm, seed in runs:
        if (arm.name, seed) in done:
            continue
        status = _run_one(cfg, arm, seed, task, log, run_dir, bar, hooks, dist, stream)
        result.statuses[(arm.name, seed)] = status
    bar.close()
    if dist.is_main:
        _append_event(run_dir, {"event": "finish", "time": _now()})
    barrier(dist)
    return result


class _Diverged(Exception):
    pass


def _run_one(
    cfg: SuiteConfig,
    arm: ArmConfig,
    seed: int,
    task: Task,
    log: RowLog,
    run_dir: Path,
    bar: ProgressBar,
    hooks: Sequence[DiagnosticHook],
    dist: DistInfo,
    stream: TextIO,
) -> str:
    """Train one ``(arm, seed)``; write its rows, checkpoints and status row; return the status."""
    ckpt = _ckpt_path(run_dir, arm.name, seed)
    train = cfg.arm_train(arm)
    eval_steps = set(cfg.eval_steps())
    diag_steps = set(cfg.diagnostic_steps())
    state: dict[str, Any] = {"step": 0}
    status, message = "ok", ""

    def row(step: int, kind: str, metric: str, value: float | None, **extra: Any) -> dict[str, Any]:
        return make_row(arm.name, seed, step, kind, metric, value, **extra)

    def diagnostics(model: nn.Module, step: int) -> list[dict[str, Any]]:
        out = []
        if step in diag_steps:
            batch = task.diagnostics_batch()
            for hook in hooks:
                for r in hook(model, batch):
                    out.append(row(step, "diag", str(r["metric"]), r.get("value"), layer=r.get("layer")))
        return out

    try:
        torch.manual_seed(seed)
        model = task.build_model(cfg.arm_model(arm)).to(task.device)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=train["lr"], betas=(cfg.betas[0], cfg.betas[1]),
        )
        if ckpt.exists():
            saved = torch.load(ckpt, map_location=task.device, weights_only=False)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optim"])
            state = saved["state"]
        else:
            metrics = task.evaluate(model)
            state = {"step": 0, "initial_loss": metrics["val_loss"], "train_time": 0.0}
            log.write([row(0, "eval", k, v) for k, v in metrics.items()] + diagnostics(model, 0))
            if dist.is_main:
                _atomic_torch_save({"model": model.state_dict(), "optim": opt.state_dict(), "state": state}, ckpt)
        ddp: nn.Module = model
        if dist.enabled:  # also at world size 1, so that the DDP path is the one tests exercise
            ddp = nn.parallel.DistributedDataParallel(model)
        limit = cfg.divergence_factor * state["initial_loss"]
        interval = {"loss": 0.0, "grad": 0.0, "n": 0, "units": 0, "time": 0.0}
        model.train()
        while state["step"] < cfg.steps:
            step = state["step"]
            lr = lr_at(step, cfg.steps, train["lr"], train["warmup_steps"], cfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            rng = np.random.default_rng([seed, dist.rank, step])
            torch.manual_seed(int(rng.integers(2**62)))
            t0 = time.perf_counter()
            batch = task.sample(rng, train["batch_size"])
            loss = task.loss(ddp, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip = train["grad_clip"] if train["grad_clip"] > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            opt.step()
            dt = time.perf_counter() - t0
            loss_value = all_reduce_sum([float(loss.detach())], dist, task.device)[0] / dist.world_size
            state["step"] = step = step + 1
            state["train_time"] += dt
            interval["loss"] += loss_value
            interval["grad"] += grad_norm
            interval["n"] += 1
            interval["units"] += task.units(batch) * dist.world_size
            interval["time"] += dt
            bar.update(1, f"{arm.name}/seed{seed} step {step} loss {loss_value:.3f}")
            diverged = not math.isfinite(loss_value) or loss_value > limit
            if not (diverged or step in eval_steps):
                log.write(diagnostics(model, step))
                continue
            n = max(1, interval["n"])
            rows = [
                row(step, "train", "train_loss", interval["loss"] / n),
                row(step, "train", "grad_norm", interval["grad"] / n),
                row(step, "train", "lr", lr),
                row(step, "train", "throughput", interval["units"] / max(interval["time"], 1e-9), unit=task.unit),
            ]
            interval = {"loss": 0.0, "grad": 0.0, "n": 0, "units": 0, "time": 0.0}
            if diverged:
                log.write(rows)
                bar.update(cfg.steps - step)
                raise _Diverged(f"train loss {loss_value:.4g} at step {step} exceeds the limit {limit:.4g} "
                                f"({cfg.divergence_factor} x the step-0 validation loss) or is not finite")
            metrics = task.evaluate(model)
            rows += [row(step, "eval", k, v) for k, v in metrics.items()]
            log.write(rows + diagnostics(model, step))
            if not math.isfinite(metrics["val_loss"]) or metrics["val_loss"] > limit:
                bar.update(cfg.steps - step)
                raise _Diverged(
                    f"validation loss {metrics['val_loss']:.4g} (eval mode) at step {step} exceeds the limit "
                    f"{limit:.4g} or is not finite, while the training loss was {rows[0]['value']}"
                )
            if dist.is_main and step < cfg.steps:
                _atomic_torch_save({"model": model.state_dict(), "optim": opt.state_dict(), "state": state}, ckpt)
    except _Diverged as exc:
        status, message = "diverged", str(exc)
    except Exception as exc:  # an arm that raises becomes an error row; the sweep goes on
        status, message = "error", f"{type(exc).__name__}: {exc}"
        if dist.is_main:
            stream.write(f"\n[normlab lab] arm {arm.name} seed {seed} failed:\n{traceback.format_exc()}")
        bar.update(cfg.steps - state["step"])
    log.write([row(state["step"], "status", "status", None, status=status, message=message[:2000],
                   train_seconds=round(float(state.get("train_time", 0.0)), 3))])
    if dist.is_main:
        ckpt.unlink(missing_ok=True)
    return status
