"""Shared pieces of the test-time adaptation methods: the per-layer report, input views by channel axis, the patched
forward of an adapted norm and the checks on a test batch.

An adapted norm keeps its class, its parameters and its state-dict keys: its ``forward`` is replaced by an instance
attribute (:class:`Patch`), so model code that calls the norm (and tools that walk the model with
:func:`~normlab.walk.iter_norms`) see the same module, and :func:`restore_forward` undoes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LayerChoice",
    "Patch",
    "batch_rows",
    "check_values_per_channel",
    "find_mask",
    "instance_rows",
    "logits_of",
    "restore_forward",
    "values_per_channel",
]


@dataclass(frozen=True)
class LayerChoice:
    """What a method does with one norm of the model.

    Attributes:
        name: the norm's qualified name in the model (``named_modules()``).
        norm: its registry (or adapter) name, e.g. ``"batch_norm"`` or ``"torch.nn.BatchNorm"``.
        adapted: whether the method changes this norm's forward or trains its parameters.
        detail: what is done to it, or why it is skipped.
    """

    name: str
    norm: str
    adapted: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.name or '<model>'} ({self.norm}): {'adapted' if self.adapted else 'skipped'}: {self.detail}"


class Patch:
    """A replacement ``forward`` for one norm module: ``fn(module, *args, **kwargs)``.

    Installed as ``module.forward`` (an instance attribute shadows the class method that ``nn.Module.__call__``
    reaches), so the module's class, parameters, buffers, hooks and state-dict keys are unchanged.
    """

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        self.module = module
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.module, *args, **kwargs)

    @staticmethod
    def install(module: nn.Module, fn: Callable[..., Any]) -> None:
        object.__setattr__(module, "forward", Patch(module, fn))


def restore_forward(module: nn.Module) -> None:
    """Remove a :class:`Patch` installed on ``module`` (its class's ``forward`` applies again)."""
    if isinstance(module.__dict__.get("forward"), Patch):
        del module.__dict__["forward"]


def class_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The module's own (class) forward, bypassing a :class:`Patch`."""
    return type(module).forward(module, *args, **kwargs)


def find_mask(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    """The padding mask a norm was called with (``mask=`` or the second positional argument), or ``None``."""
    mask = kwargs.get("mask")
    if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
        mask = args[1]
    return mask if isinstance(mask, Tensor) else None


def _axis(x: Tensor, channel_dim: int, where: str) -> int:
    if x.dim() < 2 or not -x.dim() <= channel_dim < x.dim() or channel_dim % x.dim() == 0:
        raise ValueError(
            f"{where}: expected an input (N, C, *) or (B, *, C) whose channel axis {channel_dim} is not the batch "
            f"axis, got input of size {list(x.shape)}"
        )
    return channel_dim % x.dim()


def values_per_channel(x: Tensor, channel_dim: int, mask: Tensor | None, where: str) -> int:
    """How many values of one channel a batch statistic is taken over (valid positions only with ``mask``)."""
    cd = _axis(x, channel_dim, where)
    if mask is not None:
        return int(mask.bool().sum().item())
    return x.numel() // max(x.shape[cd], 1)


def check_values_per_channel(x: Tensor, channel_dim: int, mask: Tensor | None, method: str, layer: str) -> None:
    """Batch statistics need at least two values per channel (a variance of one value is 0, an unbiased one NaN)."""
    n = values_per_channel(x, channel_dim, mask, f"{method}: layer {layer!r}")
    if n < 2:
        raise ValueError(
            f"{method}: layer {layer!r} takes its test-batch statistics over {n} value(s) per channel from an input "
            f"of size {list(x.shape)}{' with its mask' if mask is not None else ''}; expected at least 2 (a batch of "
            f"more samples, or an input with spatial/token positions)"
        )


def batch_rows(x: Tensor, channel_dim: int, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``x`` as rows ``(T, C)`` (channel axis last) and the mask as ``(T,)`` booleans (or ``None``)."""
    cd = channel_dim % x.dim()
    xs = x.movedim(cd, -1)
    flat = xs.reshape(-1, xs.shape[-1])
    return flat, (mask.reshape(-1).bool() if mask is not None else None)


def instance_rows(x: Tensor, channel_dim: int, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``x`` as ``(B, P, C)``: per sample (axis 0) its positions (every axis but batch and channel) by channel, and
    the mask as ``(B, P)`` booleans (or ``None``)."""
    cd = channel_dim % x.dim()
    xs = x.movedim(cd, -1)
    rows = xs.reshape(xs.shape[0], -1, xs.shape[-1])
    return rows, (mask.reshape(mask.shape[0], -1).bool() if mask is not None else None)


def weighted_moments(rows: Tensor, valid: Tensor | None, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, mean, biased variance)`` of ``rows`` over ``dim`` (the position axis), valid positions only."""
    if valid is None:
        var, mean = torch.var_mean(rows, dim=dim, correction=0)
        return torch.tensor(float(rows.shape[dim]), dtype=rows.dtype, device=rows.device), mean, var
    w = valid.to(rows.dtype).unsqueeze(-1)
    count = w.sum(dim=dim)
    denom = count.clamp_min(1.0)
    mean = (rows * w).sum(dim=dim) / denom
    var = ((rows - mean.unsqueeze(dim)).square() * w).sum(dim=dim) / denom
    return count.squeeze(-1), mean, var


def logits_of(output: Any) -> Tensor:
    """The logits of a model's output: a tensor, an object with ``.logits`` (normlab's and Hugging Face's model
    outputs), a mapping with ``"logits"`` or the first element of a tuple/list."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise TypeError(
            "adapt: expected the model to return logits (a tensor, an output with .logits, a dict with 'logits' or a "
            f"tuple whose first element is the logits), got {type(output).__name__}; pass logits=<function> to adapt"
        )
    return logits
