"""Batch-statistic fluctuation of batch-dependent norms: how far each training step's batch statistics are from the
running statistics the model will use at inference.

This is the diagnostic behind PowerNorm (Shen et al. 2020, https://arxiv.org/abs/2003.07845), which shows that in
Transformers the batch mean and variance fluctuate strongly around their running averages, and behind Unified
Normalization (Yang et al. 2022, https://arxiv.org/abs/2208.01313). Norms are found by :func:`normlab.iter_norms`
with the trait ``batch_dependent`` (normlab's and ``torch.nn.BatchNorm*``, never by class) and measured only in train
mode; what each compares comes from its ``batch_stat_view()``.

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
from typing import Any

import torch
from torch import Tensor, nn

from normlab.diagnostics._capture import Row
from normlab.nn._base import BatchStatView
from normlab.walk import iter_norms, norm_protocol

__all__ = ["BatchStatMonitor"]


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
        self.modules = [
            (n, m, view)
            for n, m, _ in iter_norms(model, batch_dependent=True)
            if (view := norm_protocol(m).batch_stat_view()) is not None
        ]
        self._rows: list[Row] = []
        self._steps: dict[str, int] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> BatchStatMonitor:
        for name, module, _ in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def rows(self) -> list[Row]:
        return list(self._rows)

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not module.training:
                return
            x = args[0] if args else kwargs.get("x", kwargs.get("input"))
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            view = norm_protocol(module).batch_stat_view()  # read now: a load_state_dict may have replaced buffers
            if not isinstance(x, Tensor) or view is None:
                return
            step = self._steps.get(name, 0)
            self._steps[name] = step + 1
            layer = _block_index(name, self._block_names)
            for variant, value in _deviation(view, x, mask):
                self._rows.append({"metric": "batch_stat_deviation", "module": name, "layer": layer, "step": step,
                                   "variant": variant, "value": value})

        return hook


def _channel_rows(channel_dim: int, x: Tensor, mask: Tensor | None) -> Tensor:
    """The valid positions of ``x`` as ``(n, C)``, the channel axis ``channel_dim`` last."""
    xc = x.detach().double().movedim(channel_dim % x.dim(), -1)
    if mask is None:
        return xc.reshape(-1, xc.shape[-1])
    m = mask.bool()
    if tuple(m.shape) != tuple(xc.shape[:-1]):
        m = m.reshape(*m.shape, *([1] * (xc.dim() - 1 - m.dim()))).expand(xc.shape[:-1])
    return xc[m]


@torch.no_grad()
def _deviation(view: BatchStatView, x: Tensor, mask: Tensor | None) -> Iterator[tuple[str, float]]:
    if view.transform is not None:
        x = view.transform(x)
    rows = _channel_rows(view.channel_dim, x, mask)
    if rows.shape[0] < 2:
        return
    run_s = view.running_var.detach().double()
    if view.running_mean is not None:
        run_mean = view.running_mean.detach().double()
        batch_mean = rows.mean(0)
        batch_s = rows.var(0, unbiased=True)
        yield "var", float((batch_s / run_s - 1.0).abs().mean())
        yield "mean", float(((batch_mean - run_mean).abs() / (run_s + view.eps).sqrt()).mean())
    else:
        batch_s = rows.square().mean(0)
        yield "var", float((batch_s / run_s - 1.0).abs().mean())
