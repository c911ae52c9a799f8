"""Tent: fully test-time adaptation by entropy minimization (Wang, Shelhamer, Liu, Olshausen, Darrell, ICLR 2021,
https://arxiv.org/abs/2006.10726, §3).

Per test batch: forward, loss = the batch mean of the prediction entropy ``-Σ_k p_k log p_k`` (softmax over the last
axis of the logits), backward, one optimizer step on the norms' affine parameters; the predictions returned are those
of the forward that gave the loss, i.e. from the parameters before the step. Batch-dependent norms normalize with the
test batch's statistics (the official code drops BatchNorm's running buffers; here the training-mode forward runs and
the buffers are put back after every call, so they stay the source ones).

The official code trains ``weight`` and ``bias`` of every ``nn.BatchNorm2d`` only; normlab trains the parameters named
``weight`` or ``bias`` of every norm :func:`~normlab.walk.iter_norms` finds (BatchNorm of any layout, GroupNorm,
LayerNorm and RMSNorm of a ViT, foreign norms of the adapter table), and nothing else (DyT's α, RepBN's α, EvoNorm's
``v`` stay frozen).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from normlab.tta._common import LayerChoice, check_values_per_channel, find_mask
from normlab.tta.statistics import _Layer, train_mode_forward
from normlab.walk import iter_norms

__all__ = ["TENT_DEFAULTS", "TentBatchStats", "make_optimizer", "softmax_entropy", "tent_choices"]

#: The official defaults (Tent ``conf.py``): Adam lr 1e-3, betas (0.9, 0.999), no weight decay; the SGD option uses
#: momentum 0.9, Nesterov, dampening 0; one step per batch, online (not episodic).
TENT_DEFAULTS: dict[str, Any] = {
    "optimizer": "adam",
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "momentum": 0.9,
    "dampening": 0.0,
    "nesterov": True,
    "weight_decay": 0.0,
    "steps": 1,
    "episodic": False,
    "model_train": False,
}

AFFINE_NAMES = ("weight", "bias")


def softmax_entropy(logits: Tensor) -> Tensor:
    """``-Σ_k softmax(z)_k · log_softmax(z)_k`` over the last axis (one value per prediction)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def affine_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters of a norm (and of norms nested in it) whose name is ``weight`` or ``bias``."""
    return [(n, p) for n, p in module.named_parameters() if n.rsplit(".", 1)[-1] in AFFINE_NAMES]


def tent_choices(model: nn.Module) -> list[LayerChoice]:
    """What Tent does with every norm of ``model`` (see the module docstring)."""
    out = []
    for name, module, spec in iter_norms(model):
        names = [n for n, _ in affine_parameters(module)]
        parts = [f"trains {', '.join(names)}"] if names else []
        if spec.batch_dependent:
            parts.append("test-batch statistics")
        detail = "; ".join(parts) if parts else "no weight or bias to train, and per-sample statistics"
        out.append(LayerChoice(name, spec.name, bool(parts), detail))
    return out


class TentBatchStats(_Layer):
    """A batch-dependent norm under Tent: its training-mode forward (test-batch statistics), running buffers kept."""

    method = "tent"

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        check_values_per_channel(args[0], self.channel_dim, find_mask(args, kwargs), self.method, self.name)
        return train_mode_forward(module, *args, restore_stats=True, **kwargs)


def make_optimizer(params: list[nn.Parameter], options: dict[str, Any]) -> torch.optim.Optimizer:
    """Adam or SGD with the official hyper-parameters, or ``options["optimizer"](params)`` for a callable."""
    kind = options["optimizer"]
    if callable(kind):
        opt = kind(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"tent: expected optimizer(params) to return a torch.optim.Optimizer, got "
                            f"{type(opt).__name__}")
        return opt
    if kind == "adam":
        return torch.optim.Adam(params, lr=options["lr"], betas=tuple(options["betas"]),
                                weight_decay=options["weight_decay"])
    return torch.optim.SGD(params, lr=options["lr"], momentum=options["momentum"], dampening=options["dampening"],
                           weight_decay=options["weight_decay"], nesterov=options["nesterov"])


def check_tent_options(options: dict[str, Any]) -> None:
    """Validate Tent's options (ValueError/TypeError naming the option)."""
    kind = options["optimizer"]
    if not (callable(kind) or kind in ("adam", "sgd")):
        raise ValueError(
            f"tent: expected optimizer to be 'adam', 'sgd' or a callable params -> Optimizer, got {kind!r}"
        )
    for key in ("lr", "momentum", "dampening", "weight_decay"):
        v = options[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key == "lr" and v == 0):
            raise ValueError(f"tent: expected {key} to be a number {'> 0' if key == 'lr' else '>= 0'}, got {v!r}")
    betas = options["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)):
        raise ValueError(f"tent: expected betas to be two numbers in [0, 1), got {betas!r}")
    steps = options["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"tent: expected steps to be an int >= 1, got {steps!r}")
    for key in ("episodic", "model_train", "nesterov"):
        if not isinstance(options[key], bool):
            raise TypeError(f"tent: expected {key} to be a bool, got {type(options[key]).__name__}")


def tent_step(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, logits_fn: Callable[[Any], Tensor],
              args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """``steps`` × (forward, entropy, backward, step); the logits of the last forward (before its step)."""
    logits = None
    for _ in range(steps):
        with torch.enable_grad():
            logits = logits_fn(model(*args, **kwargs))
            loss = softmax_entropy(logits).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert logits is not None
    return logits.detach()
