"""The training loop of one ``(arm, seed)``: build, train with AdamW on the suite's schedule, evaluate, checkpoint.

Crash safety. At every eval step ``S`` the rows of ``S`` are written *before* the checkpoint of ``S``, and a run is
finished exactly when its status row exists; so a resume (:mod:`normlab.lab.rundir`) that keeps the rows up to the
checkpoint and continues from it loses at most one eval interval and never duplicates a row. The data stream is a
function of ``(seed, rank, step)``, so a resumed arm draws the same batches as an uninterrupted one.

An arm whose training or validation loss is not finite or exceeds ``divergence_factor`` times its step-0 validation
loss stops with status ``diverged``; an arm that raises stops with status ``error`` (and the traceback on the
stream); either way the sweep goes on. Every evaluation also writes the arm's ``health`` rows (saturated norms,
frozen parameters, the residual stream's scale: :mod:`normlab.lab.health`), so a failure comes with its evidence.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import numpy as np
import torch
from torch import Tensor, nn

from normlab.kernels import use_impl
from normlab.lab.config import ArmConfig, SuiteConfig
from normlab.lab.dist import DistInfo, all_reduce_sum
from normlab.lab.health import HealthMonitor
from normlab.lab.progress import ProgressBar
from normlab.lab.rundir import load_checkpoint, save_checkpoint
from normlab.lab.schedule import lr_at
from normlab.lab.schema import RowLog, make_row
from normlab.lab.tasks import Task

__all__ = ["ArmRun", "DiagnosticHook", "collect_hook", "train_arm"]

DiagnosticHook = Callable[[nn.Module, dict[str, Tensor]], list[dict[str, Any]]]


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


class _Diverged(Exception):
    pass


@dataclass
class ArmRun:
    """Everything one ``(arm, seed)`` trains with: the suite, the arm, the task (data and model build), where its
    rows and checkpoint go, the progress bar, the diagnostics hooks, the DDP context and the error stream."""

    cfg: SuiteConfig
    arm: ArmConfig
    seed: int
    task: Task
    log: RowLog
    ckpt: Path
    bar: ProgressBar
    hooks: Sequence[DiagnosticHook]
    dist: DistInfo
    stream: TextIO
    diag_steps: set[int] = field(init=False)

    def __post_init__(self) -> None:
        self.diag_steps = set(self.cfg.diagnostic_steps())

    def row(self, step: int, kind: str, metric: str, value: float | None, **extra: Any) -> dict[str, Any]:
        return make_row(self.arm.name, self.seed, step, kind, metric, value, **extra)

    def health_rows(self, step: int, measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The ``health`` rows of ``step`` from :meth:`HealthMonitor.watch`'s measurements."""
        return [self.row(step, "health", str(r["metric"]), r.get("value"),
                         **{k: v for k, v in r.items() if k not in ("metric", "value")}) for r in measured]

    def diagnostics(self, model: nn.Module, step: int) -> list[dict[str, Any]]:
        """The diagnostics rows of ``step`` (none unless it is one of the suite's diagnostics steps)."""
        out = []
        if step in self.diag_steps:
            batch = self.task.diagnostics_batch()
            for hook in self.hooks:
                for r in hook(model, batch):
                    out.append(self.row(step, "diag", str(r["metric"]), r.get("value"), layer=r.get("layer")))
        return out


class _Interval:
    """Sums over the training steps since the last eval, turned into the ``train`` rows of the next one."""

    def __init__(self) -> None:
        self.loss = self.grad = self.time = 0.0
        self.n = self.units = 0

    def add(self, loss: float, grad_norm: float, units: int, seconds: float) -> None:
        self.loss += loss
        self.grad += grad_norm
        self.n += 1
        self.units += units
        self.time += seconds

    def rows(self, run: ArmRun, step: int, lr: float) -> list[dict[str, Any]]:
        n = max(1, self.n)
        return [
            run.row(step, "train", "train_loss", self.loss / n),
            run.row(step, "train", "grad_norm", self.grad / n),
            run.row(step, "train", "lr", lr),
            run.row(step, "train", "throughput", self.units / max(self.time, 1e-9), unit=run.task.unit),
        ]


def _build(run: ArmRun) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The arm's model (seeded with the run's seed) and AdamW over the task's :meth:`~Task.parameter_groups` (by
    default weight decay on matrices except embeddings), passed to the task's :meth:`~Task.prepare_optimizer`."""
    train = run.cfg.arm_train(run.arm)
    torch.manual_seed(run.seed)
    model = run.task.build_model(run.cfg.arm_model(run.arm)).to(run.task.device)
    groups = run.task.parameter_groups(model, train["weight_decay"])
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    opt = torch.optim.AdamW(groups, lr=train["lr"], betas=(run.cfg.betas[0], run.cfg.betas[1]))
    run.task.prepare_optimizer(opt, model)
    return model, opt


def _save(run: ArmRun, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if run.dist.is_main:
        save_checkpoint(run.ckpt, {"model": model.state_dict(), "optim": opt.state_dict(), "state": state})


def _start(run: ArmRun, model: nn.Module, opt: torch.optim.Optimizer, health: HealthMonitor) -> dict[str, Any]:
    """Restore the checkpoint, or evaluate step 0, write its rows and checkpoint it; returns the training state."""
    if run.ckpt.exists():
        saved = load_checkpoint(run.ckpt, run.task.device)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
        return dict(saved["state"])
    with health.watch() as measured:
        metrics = run.task.evaluate(model)
    state = {"step": 0, "initial_loss": metrics["val_loss"], "train_time": 0.0}
    run.log.write([run.row(0, "eval", k, v) for k, v in metrics.items()] + run.health_rows(0, measured)
                  + run.diagnostics(model, 0))
    _save(run, model, opt, state)
    return state


class _Step(NamedTuple):
    loss: float  # averaged over ranks
    grad_norm: float  # before clipping
    lr: float
    seconds: float
    units: int  # tokens or samples, all ranks


def _train_step(
    run: ArmRun, model: nn.Module, ddp: nn.Module, opt: torch.optim.Optimizer, step: int, health: HealthMonitor
) -> _Step:
    """One optimizer step at ``step``. The batch and any randomness of the step are drawn from ``(seed, rank,
    step)`` alone."""
    train = run.cfg.arm_train(run.arm)
    lr = lr_at(step, run.cfg.steps, train["lr"], train["warmup_steps"], run.cfg.min_lr_ratio)
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    rng = np.random.default_rng([run.seed, run.dist.rank, step])
    torch.manual_seed(int(rng.integers(2**62)))
    t0 = time.perf_counter()
    batch = run.task.sample(rng, train["batch_size"])
    loss = run.task.loss(ddp, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    health.after_backward()
    run.task.before_step(model, step)
    clip = train["grad_clip"] if train["grad_clip"] > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    opt.step()
    run.task.after_step(model, step + 1)
    dt = time.perf_counter() - t0
    loss_value = all_reduce_sum([float(loss.detach())], run.dist, run.task.device)[0] / run.dist.world_size
    return _Step(loss_value, grad_norm, lr, dt, run.task.units(batch) * run.dist.world_size)


def _eval_step(
    run: ArmRun, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], rows: list[dict[str, Any]],
    limit: float, health: HealthMonitor,
) -> None:
    """At an eval step: evaluate, write the interval's ``rows`` with the eval and diagnostics rows, then stop a
    diverged arm or checkpoint (rows first, then the checkpoint: see the module docstring)."""
    step = state["step"]
    with health.watch() as measured:
        metrics = run.task.evaluate(model)
    if step == run.cfg.steps:
        metrics.update(run.task.final_evaluate(model))
    rows = rows + [run.row(step, "eval", k, v) for k, v in metrics.items()] + run.health_rows(step, measured)
    run.log.write(rows + run.diagnostics(model, step))
    if not math.isfinite(metrics["val_loss"]) or metrics["val_loss"] > limit:
        run.bar.update(run.cfg.steps - step)
        raise _Diverged(
            f"validation loss {metrics['val_loss']:.4g} (eval mode) at step {step} exceeds the limit "
            f"{limit:.4g} or is not finite, while the training loss was {rows[0]['value']}"
        )
    if step < run.cfg.steps:
        _save(run, model, opt, state)


def _train(
    run: ArmRun, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], health: HealthMonitor
) -> None:
    """Train from ``state["step"]`` to the suite's last step, updating ``state``."""
    cfg = run.cfg
    eval_steps = set(cfg.eval_steps())
    ddp: nn.Module = model
    if run.dist.enabled:  # also at world size 1, so that the DDP path is the one tests exercise
        ddp = nn.parallel.DistributedDataParallel(model)
    limit = cfg.divergence_factor * state["initial_loss"]
    interval = _Interval()
    model.train()
    while state["step"] < cfg.steps:
        done = _train_step(run, model, ddp, opt, state["step"], health)
        state["step"] = step = state["step"] + 1
        state["train_time"] += done.seconds
        interval.add(done.loss, done.grad_norm, done.units, done.seconds)
        run.bar.update(1, f"{run.arm.name}/seed{run.seed} step {step} loss {done.loss:.3f}")
        diverged = not math.isfinite(done.loss) or done.loss > limit
        if not (diverged or step in eval_steps):
            run.log.write(run.diagnostics(model, step))
            continue
        rows = interval.rows(run, step, done.lr)
        interval = _Interval()
        if diverged:
            run.log.write(rows)
            run.bar.update(cfg.steps - step)
            raise _Diverged(f"train loss {done.loss:.4g} at step {step} exceeds the limit {limit:.4g} "
                            f"({cfg.divergence_factor} x the step-0 validation loss) or is not finite")
        _eval_step(run, model, opt, state, rows, limit, health)


def train_arm(run: ArmRun) -> str:
    """Train one ``(arm, seed)`` from its checkpoint or from scratch; write its rows, checkpoints and status row
    (the checkpoint is deleted with it); return the status (``ok``, ``diverged`` or ``error``)."""
    state: dict[str, Any] = {"step": 0}
    status, message = "ok", ""
    try:
        model, opt = _build(run)
        health = HealthMonitor(model, run.dist)
        with use_impl(run.cfg.impl):  # type: ignore[arg-type]  # validated against IMPLS
            state = _start(run, model, opt, health)
            _train(run, model, opt, state, health)
    except _Diverged as exc:
        status, message = "diverged", str(exc)
    except Exception as exc:  # an arm that raises becomes an error row; the sweep goes on
        status, message = "error", f"{type(exc).__name__}: {exc}"
        if run.dist.is_main:
            run.stream.write(f"\n[normlab lab] arm {run.arm.name} seed {run.seed} failed:\n{traceback.format_exc()}")
        run.bar.update(run.cfg.steps - state["step"])
    run.log.write([run.row(state["step"], "status", "status", None, status=status, message=message[:2000],
                           train_seconds=round(float(state.get("train_time", 0.0)), 3))])
    if run.dist.is_main:
        run.ckpt.unlink(missing_ok=True)
    return status
