"""A complete LayerNorm-removal fine-tuning run (Baroni et al. 2025, https://arxiv.org/abs/2507.02559) in one call,
:func:`remove_ln_by_finetuning`, for the ``normlab convert --to remove-ln`` command and the examples. The pieces
(:func:`~normlab.surgery.prepare_ln_removal`, :func:`~normlab.surgery.calibrate_sigma`,
:class:`~normlab.surgery.RemovalSchedule`, :class:`~normlab.surgery.StdAuxLoss`) plug into any other training loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normlab.surgery.ln_removal import (
    LNRemoval,
    RemovalSchedule,
    StdAuxLoss,
    calibrate_sigma,
    prepare_ln_removal,
)

__all__ = ["RemovalRun", "remove_ln_by_finetuning"]


@dataclass
class RemovalRun:
    """The result of :func:`remove_ln_by_finetuning`: the removal (every norm fixed), the schedule and the losses."""

    removal: LNRemoval
    schedule: RemovalSchedule
    sigma: dict[str, float]
    losses: list[float] = field(default_factory=list)
    switched_at: dict[str, int] = field(default_factory=dict)


def _cosine_lr(step: int, steps: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def remove_ln_by_finetuning(
    model: nn.Module,
    batches: Iterator[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    steps: int,
    calibration: Iterable[Any],
    switch_window: tuple[float, float] = (0.1, 0.7),
    lr: float = 1e-4,
    min_lr_ratio: float = 0.5,
    warmup: int | None = None,
    weight_decay: float = 0.01,
    clip: float = 1.0,
    aux_weight: float | None = None,
    aux_where: str = "final",
    momentum: float | None = None,
    progress: Callable[[int, float, list[str]], None] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> RemovalRun:
    """Prepare ``model`` (a deep copy), calibrate σ̄ on ``calibration``, then fine-tune for ``steps`` AdamW steps while
    a :class:`~normlab.surgery.RemovalSchedule` switches the norms one at a time, evenly over the fraction
    ``switch_window`` of the run (the paper's GPT-2 small run switches over steps 20 to 104 of 300). The learning rate
    follows the paper's shape: linear warm-up (default: ``switch_window[0]`` of the run) then cosine to
    ``lr · min_lr_ratio``; AdamW with weight decay 0.01 and gradient clipping at 1.0.

    Args:
        model: the model whose LayerNorms are removed (left unchanged).
        batches: an endless iterator of training batches.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (task loss or distillation against the original).
        steps: optimizer steps in all.
        calibration: batches for :func:`~normlab.surgery.calibrate_sigma` (``forward`` calls them).
        switch_window: the first and last switch as fractions of ``steps``.
        lr, min_lr_ratio, warmup, weight_decay, clip: the optimizer settings above.
        aux_weight: add :class:`~normlab.surgery.StdAuxLoss` with this weight, on ``aux_where``.
        momentum: σ̄ tracking while a norm is real (see :func:`~normlab.surgery.prepare_ln_removal`).
        progress: ``progress(step, loss, switched_now)`` after every step.
        forward: how calibration batches are run (default ``model(batch)`` / ``model(**batch)``).

    Returns:
        A :class:`RemovalRun`; ``run.removal.model`` has every norm in fixed-scale mode and is in eval mode.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"remove_ln_by_finetuning: expected steps to be an int >= 1, got {steps!r}")
    lo, hi = switch_window
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"remove_ln_by_finetuning: expected 0 <= switch_window[0] <= [1] <= 1, got {switch_window}")
    removal = prepare_ln_removal(model, momentum=momentum)
    sigma = calibrate_sigma(removal, calibration, forward=forward)
    last = max(steps - 1, 0)
    schedule = RemovalSchedule.evenly(removal, int(lo * last), int(hi * last))
    run = RemovalRun(removal, schedule, sigma)
    net = removal.model
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    aux = StdAuxLoss(removal, aux_weight, where=aux_where) if aux_weight else None
    warm = max(1, int(lo * steps)) if warmup is None else max(1, warmup)
    try:
        for step in range(steps):
            flipped = schedule(step)
            run.switched_at |= dict.fromkeys(flipped, step)
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(step, steps, warm, lr, lr * min_lr_ratio)
            loss = loss_fn(net, next(batches)) + (aux() if aux is not None else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            run.losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, run.losses[-1], flipped)
    finally:
        if aux is not None:
            aux.remove()
    run.switched_at |= dict.fromkeys(schedule(steps), steps)  # nothing is left in real mode
    net.eval()
    return run
