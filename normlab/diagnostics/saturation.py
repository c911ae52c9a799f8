"""Saturation of norms with a bounded nonlinearity: the share of a norm's input elements that land where its
nonlinearity is flat.

DyT (Zhu et al. 2025, https://arxiv.org/abs/2503.10622) computes ``γ ⊙ tanh(αx) + β``. Once ``|αx|`` is large, tanh
returns ±1 and passes back almost no gradient (in float32 exactly none beyond ``|αx| ≈ 9``): a DyT whose inputs grow
faster than ``α`` shrinks stops the gradient to everything before it. Measuring the saturated share per norm shows
this directly.

A norm declares its bounded nonlinearity with a method ``saturation(x) -> Tensor`` returning a bool mask of the
elements of its input ``x`` that saturate (DyT: ``|αx| > 2``); the threshold is the norm's own fact. Every module of
a model with such a method is measured (:func:`saturating_norms`), so a new tanh-type norm needs nothing here.

>>> with SaturationMonitor(model) as monitor:  # doctest: +SKIP
...     model(input_ids)
>>> monitor.fractions()  # doctest: +SKIP
{'blocks.0.attn_norm': 0.0, ..., 'final_norm': 0.998}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SaturationMonitor", "saturating_norms", "saturation_rows"]


def saturating_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, module)`` pairs of ``model`` (itself included) that declare a bounded nonlinearity
    (a callable ``saturation`` attribute), in ``named_modules`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"saturating_norms: expected model to be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if callable(getattr(m, "saturation", None))]


class SaturationMonitor:
    """Counts, per saturating norm of ``model``, the saturated and the total input elements of every forward while
    the monitor is active (a context manager; hooks are removed on exit, even after an exception).

    Counts stay on the model's device until read, so monitoring adds no host synchronisation per forward.

    Args:
        model: any module; the norms measured are :func:`saturating_norms` of it (none: the monitor records
            nothing).
    """

    def __init__(self, model: nn.Module) -> None:
        self.norms = saturating_norms(model)
        self._saturated: dict[str, Tensor | int] = {name: 0 for name, _ in self.norms}
        self._total: dict[str, int] = {name: 0 for name, _ in self.norms}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if not isinstance(x, Tensor):
                return
            with torch.no_grad():
                mask = module.saturation(x)  # type: ignore[operator]
                self._saturated[name] = self._saturated[name] + mask.sum()
            self._total[name] += mask.numel()

        return hook

    def __enter__(self) -> SaturationMonitor:
        for name, module in self.norms:
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{norm name: (saturated elements, total elements)}`` over the forwards seen so far."""
        return {name: (int(self._saturated[name]), self._total[name]) for name, _ in self.norms}

    def fractions(self) -> dict[str, float]:
        """``{norm name: saturated share of its input elements}`` (NaN for a norm that saw no input)."""
        return {name: (s / t if t else float("nan")) for name, (s, t) in self.counts().items()}

    def rows(self) -> list[dict[str, Any]]:
        """One row per norm: ``metric="saturation"``, ``module``, ``value`` (the share) and ``count`` (elements)."""
        return [
            {"metric": "saturation", "module": name, "value": (s / t if t else float("nan")), "count": t}
            for name, (s, t) in self.counts().items()
        ]


def saturation_rows(
    model: nn.Module, batches: Tensor | Mapping[str, Any] | Iterable[Tensor | Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Run ``model`` in eval mode without gradients over ``batches`` (a token-id tensor, a mapping of keyword
    arguments for ``model(**batch)``, or an iterable of either) and return :meth:`SaturationMonitor.rows`; the
    model's train/eval modes are restored."""
    items: Iterable[Tensor | Mapping[str, Any]]
    items = [batches] if isinstance(batches, (Tensor, Mapping)) else batches
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with SaturationMonitor(model) as monitor, torch.no_grad():
            for batch in items:
                model(**batch) if isinstance(batch, Mapping) else model(batch)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return monitor.rows()
