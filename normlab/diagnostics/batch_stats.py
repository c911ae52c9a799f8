"""Batch-statistic fluctuation of batch-dependent norms: how far each training step's batch statistics are from the
running statistics the model will use at inference.

This is the diagnostic behind PowerNorm (Shen et al. 2020, https://arxiv.org/abs/2003.07845), which shows that in
Transformers the batch mean and variance fluctuate strongly around their running averages, and behind Unified
Normalization (Yang et al. 2022, https://arxiv.org/abs/2208.01313). Modules are selected by their registry trait
``batch_dependent`` (never by class), and only in train mode.

Per norm layer and forward, with running statistics ``(μ, s)`` as they were **before** that forward updated them and
the batch statistics ``(μ_B, s_B)`` of the valid positions of its input, averaged over channels ``c``:

- ``variant="var"``: ``mean_c |s_B,c / s_c − 1|``;
- ``variant="mean"``: ``mean_c |μ_B,c − μ_c| / sqrt(s_c + eps)``, the mean shift in units of the running standard
  deviation (a ratio ``μ_B/μ`` would be undefined at the usual ``μ = 0`` start).

``s`` is the statistic the norm divides by: the unbiased variance for BatchNorm-like norms (``running_mean`` and
``running_var``, as torch stores it), the quadratic mean of the GroupScaling output for PowerNorm (``running_phi``)
and the quadratic mean for UnifiedNorm (``running_var`` without ``running_mean``); the last two have no mean rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normlab.diagnostics._capture import Row
from normlab.registry import NormSpec

__all__ = ["BatchStatMonitor", "batch_dependent_modules"]


@dataclass
class _Kind:
    owner: nn.Module  # the module holding the running buffers (the norm itself, or e.g. PRepBN's norm2)
    centred: bool  # statistics are mean/variance (BatchNorm) rather than a quadratic mean
    transform: Callable[[Tensor], Tensor] | None  # applied to the input before the statistics (GroupScaling)


def _stat_kind(module: nn.Module) -> _Kind | None:
    for owner in (module, *module.children()):
        names = {n for n, _ in owner.named_buffers(recurse=False)}
        if "running_phi" in names:
            gs = getattr(owner, "group_scaling", None)
            return _Kind(owner, False, gs if isinstance(gs, nn.Module) else None)
        if "running_var" in names and getattr(owner, "running_var", None) is not None:
            return _Kind(owner, "running_mean" in names and getattr(owner, "running_mean", None) is not None, None)
    return None


def batch_dependent_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every module whose registry spec is ``batch_dependent`` (outermost only:
    a registered norm inside another, such as PRepBatchNorm's RepBN, is measured through its parent)."""
    out: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        spec = getattr(type(m), "norm_spec", None)
        if isinstance(spec, NormSpec) and spec.batch_dependent:
            if any(name.startswith(p + ".") for p, _ in out):
                continue
            out.append((name, m))
    return out


def _block_index(name: str, block_names: dict[str, int]) -> int | None:
    for prefix, ell in block_names.items():
        if name == prefix or name.startswith(prefix + "."):
            return ell
    return None


class BatchStatMonitor:
    """Forward pre-hooks on the batch-dependent norms that record the batch-vs-running deviation of every
    train-mode forward; use it around a training loop.

    >>> monitor = BatchStatMonitor(model)  # doctest: +SKIP
    >>> with monitor:  # doctest: +SKIP
    ...     for step in range(100):
    ...         model(**batch).loss.backward(); opt.step(); opt.zero_grad()
    >>> rows = monitor.rows()  # doctest: +SKIP

    Rows: ``metric="batch_stat_deviation"``, ``module`` (qualified name), ``layer`` (1-based index of the block
    containing it, ``None`` outside the blocks), ``step`` (0-based count of this module's train-mode forwards while
    monitored), ``variant`` ``var`` / ``mean`` and ``value`` (see the module docstring). Eval-mode forwards and
    norms without running statistics (``track_running_stats=False``) are not recorded.

    Args:
        model: the model.
        layers: the blocks used for the ``layer`` column (default: discovered; ``None`` layers if none found).
    """

    def __init__(self, model: nn.Module, *, layers: list[nn.Module] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"BatchStatMonitor: expected model to be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        if layers is None:
            from normlab.diagnostics._capture import find_layers

            try:
                layers = find_layers(model)
            except ValueError:
                layers = []
        ids = {id(b): i + 1 for i, b in enumerate(layers)}
        self._block_names = {n: ids[id(m)] for n, m in model.named_modules() if id(m) in ids}
        self.modules = [(n, m, k) for n, m in batch_dependent_modules(model) if (k := _stat_kind(m)) is not None]
        self._rows: list[Row] = []
        self._steps: dict[str, int] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> BatchStatMonitor:
        for name, module, kind in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._hook(name, kind), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def rows(self) -> list[Row]:
        return list(self._rows)

    def _hook(self, name: str, kind: _Kind) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not module.training:
                return
            x = args[0] if args else kwargs.get("x", kwargs.get("input"))
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            if not isinstance(x, Tensor):
                return
            step = self._steps.get(name, 0)
            self._steps[name] = step + 1
            layer = _block_index(name, self._block_names)
            for variant, value in _deviation(module, kind, x, mask):
                self._rows.append({"metric": "batch_stat_deviation", "module": name, "layer": layer, "step": step,
                                   "variant": variant, "value": value})

        return hook


def _channel_rows(module: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    """The valid positions of ``x`` as ``(n, C)`` with the channel axis of ``module`` (``channel_dim``, default -1)."""
    cd = int(getattr(module, "channel_dim", -1)) % x.dim()
    xc = x.detach().double().movedim(cd, -1)
    if mask is None:
        return xc.reshape(-1, xc.shape[-1])
    m = mask.bool()
    if tuple(m.shape) != tuple(xc.shape[:-1]):
        m = m.reshape(*m.shape, *([1] * (xc.dim() - 1 - m.dim()))).expand(xc.shape[:-1])
    return xc[m]


def _buffer(owner: nn.Module, name: str) -> Tensor:
    value = getattr(owner, name)
    if not isinstance(value, Tensor):
        raise TypeError(f"BatchStatMonitor: expected {type(owner).__name__}.{name} to be a Tensor, got {value!r}")
    return value.detach().double()


@torch.no_grad()
def _deviation(module: nn.Module, kind: _Kind, x: Tensor, mask: Tensor | None) -> Iterator[tuple[str, float]]:
    if kind.transform is not None:
        x = kind.transform(x)
    rows = _channel_rows(module, x, mask)
    if rows.shape[0] < 2:
        return
    owner = kind.owner
    eps = float(getattr(owner, "eps", 1e-5))
    if kind.centred:
        run_mean = _buffer(owner, "running_mean")
        run_s = _buffer(owner, "running_var")
        batch_mean = rows.mean(0)
        batch_s = rows.var(0, unbiased=True)
        yield "var", float((batch_s / run_s - 1.0).abs().mean())
        yield "mean", float(((batch_mean - run_mean).abs() / (run_s + eps).sqrt()).mean())
    else:
        run_s = _buffer(owner, "running_phi" if hasattr(owner, "running_phi") else "running_var")
        batch_s = rows.square().mean(0)
        yield "var", float((batch_s / run_s - 1.0).abs().mean())
