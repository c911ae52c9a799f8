"""Statistics recalibration: :func:`recalibrate_stats` re-estimates the running statistics of a model's batch-statistic
norms on data, with every parameter and every other piece of state left as it was.

SLAB (Guo et al., ICML 2024, https://arxiv.org/abs/2405.11582, §5.1) makes this part of its recipe: drop-path
shifts the variance the RepBN statistics were gathered under, so after training all parameters are frozen and only
the RepBN statistics are updated on training data. The same pass fits every norm whose eval form uses running
statistics: BatchNorm (https://arxiv.org/abs/1502.03167), RepBN / PRepBN, PowerNorm
(https://arxiv.org/abs/2003.07845), Unified Normalization (https://arxiv.org/abs/2208.01313) and ``torch.nn``
BatchNorm layers ("precise BN"). The norms are found by :func:`normlab.iter_norms`; each says how its running
statistics are re-estimated through its ``recalibration_plan()``, which this pass executes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from normlab.nn._base import RecalibrationPlan
from normlab.walk import iter_norms, norm_protocol

__all__ = ["RecalibrationReport", "recalibrate_stats"]


@dataclass
class RecalibrationReport:
    """What :func:`recalibrate_stats` did.

    Attributes:
        model: the model (changed in place: only the listed norms' running statistics).
        recalibrated: module paths of the norms whose running statistics were re-estimated.
        calls: per recalibrated norm, how many batch statistics it saw (forward calls during the pass).
        skipped: ``(path, reason)`` for batch-statistic norms left as they were: without running statistics
            (nothing to recalibrate) or not called by the forward during the pass (their statistics are restored).
        num_batches: batches run through the model.
        momentum: the update used (``None`` = cumulative average).
        reset: whether the statistics started from their initial values.
    """

    model: nn.Module
    recalibrated: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    num_batches: int = 0
    momentum: float | None = None
    reset: bool = True

    def __str__(self) -> str:
        how = "cumulative average" if self.momentum is None else f"EMA, momentum={self.momentum}"
        lines = [
            f"recalibrate_stats: {len(self.recalibrated)} norm(s) over {self.num_batches} batch(es) ({how}, "
            f"reset={self.reset})"
        ]
        lines += [f"  {p}: {self.calls.get(p, 0)} batch statistic(s)" for p in self.recalibrated]
        lines += [f"  skipped {p}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


@dataclass
class _Target:
    """One norm, the plan its protocol gave (:class:`~normlab.nn._base.RecalibrationPlan`) and its calls so far."""

    path: str
    module: nn.Module
    plan: RecalibrationPlan
    calls: int = 0


_NO_STATS = "track_running_stats=False: eval mode uses batch statistics, there are no running statistics"
_NOT_CALLED = "not called by the forward during the pass: running statistics left as they were"


def _find_targets(model: nn.Module) -> tuple[list[_Target], list[tuple[str, str]]]:
    """The batch-statistic norms with running statistics, each with its plan, and those with nothing to do.

    Raises:
        TypeError: a norm with running statistics whose class has no recalibration rule. ValueError: no norm to
            recalibrate.
    """
    targets: list[_Target] = []
    skipped: list[tuple[str, str]] = []
    for path, m, spec in iter_norms(model, has_running_stats=True, batch_dependent=True):
        where = path or "<model>"
        try:
            plan = norm_protocol(m).recalibration_plan()
        except NotImplementedError as exc:
            raise TypeError(
                f"recalibrate_stats: norm {where} ({type(m).__name__}, registered as {spec.name!r}) has running "
                f"statistics but no recalibration rule; implement recalibration_plan() on its class ({exc})"
            ) from exc
        if plan is None:
            skipped.append((where, _NO_STATS))
        else:
            targets.append(_Target(where, m, plan))
    if not targets:
        why = f" (skipped: {'; '.join(f'{p}: {r}' for p, r in skipped)})" if skipped else ""
        raise ValueError(
            f"recalibrate_stats: {type(model).__name__} has no batch-statistic norm with running statistics to "
            f"recalibrate{why}"
        )
    return targets, skipped


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(
        f"recalibrate_stats: expected each batch to be a Tensor, a tuple/list of positional arguments or a mapping of "
        f"keyword arguments, got {type(batch).__name__}; pass forward=(model, batch) -> ... for other batches"
    )


def _blend(old: Tensor, new: Tensor, weight: float) -> Tensor:
    """``old + weight·(new − old)`` in at least float32 (half buffers round once)."""
    ct = torch.promote_types(old.dtype, torch.float32)
    return old.to(ct).lerp(new.to(ct), weight).to(old.dtype)


def recalibrate_stats(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    reset: bool = True,
    momentum: float | None = None,
    max_batches: int | None = None,
) -> RecalibrationReport:
    """Re-estimate the running statistics of every batch-statistic norm of ``model`` on ``batches``; nothing else moves.

    SLAB's final step (freeze all parameters, update only the RepBN statistics on training data), for every norm
    with the registry traits ``has_running_stats`` and ``batch_dependent`` (BatchNorm, RepBN, PRepBN, PowerNorm,
    UnifiedNorm) and every ``torch.nn.BatchNorm*d`` / ``SyncBatchNorm``.

    During the pass the whole model is in eval mode (dropout and drop-path off) except those norms, which run in
    train mode and normalise with their batch statistic; everything runs under ``torch.no_grad()``. Per norm call
    the batch statistic is the one its training forward computes (valid tokens only when the model passes a mask;
    all-reduced across ranks when the norm syncs):

    * BatchNorm / RepBN / PRepBN: the mean and the unbiased variance (``running_mean``, ``running_var``);
    * PowerNorm: the quadratic mean of the GroupScaled input (``running_phi``);
    * UnifiedNorm: the second moment of the input (``running_var``).

    The running statistic becomes their cumulative average over the pass (``momentum=None``: every call weighs the
    same, "precise BN"), or follows ``running <- (1 − momentum)·running + momentum·batch`` (torch's convention,
    whatever the norm's own momentum convention is).

    What does not move: parameters and their ``requires_grad``; every module's train/eval flag (restored);
    PRepBN's schedule (``warm``, ``iter``, ``num_step``): the pass runs its RepBN branch as eval does (λ held at 0)
    and the LayerNorm → RepBN ramp resumes where it was; PowerNorm's and UnifiedNorm's step counter ``iters`` (so
    their warm-up and calibration-ratio schedules are not advanced by forwards that are not training steps), UN's
    windows (``buffer_x2``, ``buffer_gz``), ``ema_gz`` and ``skip_counter``. ``num_batches_tracked`` of BatchNorm
    types counts the pass's calls, as torch's would (from 0 after a reset). A norm the forward never calls during
    the pass (an unused branch, a head the batches do not reach) keeps all its statistics, ``reset`` or not, and is
    listed in ``report.skipped``, not ``report.recalibrated``; if no norm is called, ``recalibrated`` is empty.

    Args:
        model: any module; changed in place.
        batches: an iterable of batches (e.g. a DataLoader over training data, without augmentation noise you do
            not want in the statistics).
        forward: ``forward(model, batch)`` runs one batch. Default: ``model(batch)`` for a Tensor, ``model(*batch)``
            for a tuple/list, ``model(**batch)`` for a mapping.
        reset: start from the initial statistics (mean 0, variance / quadratic mean 1). Default ``True``.
        momentum: ``None`` (default) for the cumulative average of the pass, which replaces the old statistics and so
            needs ``reset=True``; or a float in ``(0, 1]`` for the EMA above (with ``reset=False`` it blends into the
            statistics the model has).
        max_batches: stop after this many batches (``None``: all of ``batches``).

    Returns:
        A :class:`RecalibrationReport`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, a batch of an unknown kind, a bad argument type (``reset``
            not a bool, ``momentum`` / ``max_batches`` not a number / int, ``forward`` not callable, ``batches`` not
            an iterable), or a registered batch-statistic norm without a rule. ValueError: ``momentum`` out of
            range, ``momentum=None`` with ``reset=False``, ``max_batches < 1``, no batch-statistic norm with running
            statistics, no batch.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()
        >>> report = recalibrate_stats(net, [torch.randn(16, 4) + 3.0 for _ in range(4)])
        >>> report.recalibrated, report.num_batches, net.training
        (['1'], 4, False)
    """
    _check_arguments(model, batches, forward, reset, momentum, max_batches)
    targets, skipped = _find_targets(model)
    mom = None if momentum is None else float(momentum)
    run = forward if forward is not None else _default_forward
    count = _run_pass(model, targets, batches, run, reset=reset, momentum=mom, max_batches=max_batches)
    return _report(model, targets, skipped, num_batches=count, momentum=mom, reset=reset)


def _check_arguments(model: Any, batches: Any, forward: Any, reset: Any, momentum: Any, max_batches: Any) -> None:
    """Raise the TypeError / ValueError naming the first bad argument of :func:`recalibrate_stats`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate_stats: expected model to be an nn.Module, got {type(model).__name__}")
    if not isinstance(reset, bool):
        raise TypeError(f"recalibrate_stats: expected reset to be a bool, got {type(reset).__name__}")
    if momentum is not None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            got = type(momentum).__name__
            raise TypeError(f"recalibrate_stats: expected momentum to be a float or None, got {got}")
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"recalibrate_stats: expected momentum in (0, 1] or None, got {momentum!r}")
    elif not reset:
        raise ValueError(
            "recalibrate_stats: momentum=None (cumulative average over the pass) replaces the statistics and needs "
            "reset=True, got reset=False; pass a momentum in (0, 1] to blend into the existing statistics"
        )
    if max_batches is not None:
        if isinstance(max_batches, bool) or not isinstance(max_batches, int):
            got = type(max_batches).__name__
            raise TypeError(f"recalibrate_stats: expected max_batches to be an int or None, got {got}")
        if max_batches < 1:
            raise ValueError(f"recalibrate_stats: expected max_batches to be an int >= 1 or None, got {max_batches!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"recalibrate_stats: expected forward to be callable or None, got {type(forward).__name__}")
    if not isinstance(batches, Iterable) or isinstance(batches, (Tensor, str, bytes)):
        raise TypeError(
            f"recalibrate_stats: expected batches to be an iterable of batches (a list, a DataLoader), got "
            f"{type(batches).__name__}"
        )


@dataclass
class _Snapshot:
    """The state the pass changes and must give back: every module's train flag, the attributes the plans override,
    the buffers they keep (counters, windows), and the fitted statistics themselves (returned when the pass fails, or
    per norm when the forward never called it: a reset would otherwise leave it at mean 0 / variance 1, fitted to
    nothing)."""

    modes: dict[nn.Module, bool]
    attrs: list[tuple[Any, str, Any]]
    bufs: list[tuple[Tensor, Tensor]]
    stats: list[tuple[_Target, Tensor, Tensor]]

    @classmethod
    def take(cls, model: nn.Module, targets: list[_Target]) -> _Snapshot:
        plans = [t.plan for t in targets]
        return cls(
            modes={m: m.training for m in model.modules()},
            attrs=[(obj, name, getattr(obj, name)) for p in plans for obj, name, _ in p.overrides],
            bufs=[(b, b.clone()) for p in plans for b in [*(c for c, _ in p.counters), *p.keep]],
            stats=[
                (t, b, b.clone())
                for t in targets
                for b in [*(s for s, _ in t.plan.stats), t.plan.tracked]
                if b is not None
            ],
        )

    def restore(self, *, failed: bool) -> None:
        """Give everything back; the statistics of a norm only if the pass ``failed`` or never called it."""
        with torch.no_grad():
            for buf, value in self.bufs:
                buf.copy_(value)
            for t, buf, value in self.stats:
                if failed or t.calls == 0:
                    buf.copy_(value)
        for obj, name, value in self.attrs:
            setattr(obj, name, value)
        for m, training in self.modes.items():
            m.training = training


def _enter_pass(
    model: nn.Module, targets: list[_Target], handles: list[RemovableHandle], *, reset: bool, momentum: float | None
) -> None:
    """Put the model in recalibration mode (under ``no_grad``): statistics reset if asked, the plans' overrides
    set, everything in eval mode except the targets, each target hooked; the hooks are appended to ``handles``."""
    plans = [t.plan for t in targets]
    if reset:
        for p in plans:
            for buf, init in p.stats:
                buf.fill_(init)
            if p.tracked is not None:
                p.tracked.zero_()
    for obj, name, value in (o for p in plans for o in p.overrides):
        setattr(obj, name, value)
    model.eval()
    for t in targets:
        t.module.train()
        handles += _hooks(t, momentum)


def _run_pass(
    model: nn.Module,
    targets: list[_Target],
    batches: Iterable[Any],
    run: Callable[[nn.Module, Any], Any],
    *,
    reset: bool,
    momentum: float | None,
    max_batches: int | None,
) -> int:
    """Run the batches through the model in recalibration mode and put back everything but the fitted statistics
    (all of it on an error); return how many batches ran. Raises ValueError when there was no batch."""
    snapshot = _Snapshot.take(model, targets)
    handles: list[RemovableHandle] = []
    count = 0
    failed = True
    try:
        with torch.no_grad():
            _enter_pass(model, targets, handles, reset=reset, momentum=momentum)
            for batch in batches:
                if max_batches is not None and count >= max_batches:
                    break
                run(model, batch)
                count += 1
        failed = False
    finally:
        for h in handles:
            h.remove()
        snapshot.restore(failed=failed)
    if count == 0:
        raise ValueError("recalibrate_stats: expected at least one batch, got an empty batches iterable")
    return count


def _report(
    model: nn.Module,
    targets: list[_Target],
    skipped: list[tuple[str, str]],
    *,
    num_batches: int,
    momentum: float | None,
    reset: bool,
) -> RecalibrationReport:
    """The report: the norms the pass called, and the skipped ones (in module order) with the reason."""
    called = [t for t in targets if t.calls > 0]
    skipped = skipped + [(t.path, _NOT_CALLED) for t in targets if t.calls == 0]
    order = {path or "<model>": i for i, (path, _) in enumerate(model.named_modules())}
    skipped.sort(key=lambda s: order.get(s[0], len(order)))
    return RecalibrationReport(
        model=model,
        recalibrated=[t.path for t in called],
        calls={t.path: t.calls for t in called},
        skipped=skipped,
        num_batches=num_batches,
        momentum=momentum,
        reset=reset,
    )


def _hooks(t: _Target, momentum: float | None) -> list[RemovableHandle]:
    """Before a call: set the counters and remember the statistics; after it: blend in the batch statistic."""
    old: list[Tensor] = []

    def pre(module: nn.Module, args: Any) -> None:
        for buf, value in t.plan.counters:
            buf.fill_(value)
        old[:] = [buf.clone() for buf, _ in t.plan.stats]

    def post(module: nn.Module, args: Any, output: Any) -> None:
        t.calls += 1
        weight = 1.0 / t.calls if momentum is None else momentum
        for (buf, _), before in zip(t.plan.stats, old, strict=True):
            buf.copy_(_blend(before, buf, weight))  # buf holds the batch statistic the forward wrote

    return [t.module.register_forward_pre_hook(pre), t.module.register_forward_hook(post)]
