"""Failure diagnosis measured inside the training loop: what an arm's ``health`` rows hold at every eval step.

* ``saturation:<norm>`` and ``saturation_max``: the share of a bounded-nonlinearity norm's input elements that
  saturate (DyT: ``|αx| > 2``; :mod:`normlab.diagnostics.saturation`), per norm, over the evaluation forwards.
* ``frozen_fraction``: the share of parameter elements whose tensor had an exactly zero gradient at *every* step of
  the interval since the previous eval (a parameter without a gradient counts as zero). A saturated DyT in front of
  the head makes every earlier parameter's gradient exactly zero; the network is then frozen and only the head
  learns. The row also carries ``frozen_tensors`` and the first few ``names``.
* ``hidden_rms_max``: the largest root-mean-square of a block's output (the residual stream) over the evaluation
  forwards, and in ``block`` which block (1-based). An exploding residual stream drives bounded norms into
  saturation and overflows half precision.

The gradient check adds one ``ne(0).any()`` per parameter and step, kept on the device until the eval reads it;
the forward measurements ride along the evaluation forwards (no extra forward). Under DDP the counts are summed
over ranks (every rank evaluates its slice); the gradients are already identical on every rank. What the rows mean
for an arm (flags, thresholds) is :mod:`normlab.lab.diagnosis`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from normlab.diagnostics import SaturationMonitor, find_layers
from normlab.lab.dist import DistInfo, all_reduce_sum

__all__ = ["HEALTH_METRICS", "HealthMonitor"]

HEALTH_METRICS = ("saturation_max", "frozen_fraction", "hidden_rms_max")
_NAMES_KEPT = 8


class HealthMonitor:
    """The health measurements of one model (see the module docstring).

    Args:
        model: the (unwrapped) model being trained.
        dist: the DDP context; counts of the evaluation forwards are summed over its ranks.
    """

    def __init__(self, model: nn.Module, dist: DistInfo) -> None:
        self.model = model
        self.dist = dist
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._nonzero: Tensor | None = None
        self._steps = 0
        try:
            self.blocks = find_layers(model)
        except ValueError:  # a model without a block list (the digits CNN): no residual stream to measure
            self.blocks = []

    def after_backward(self) -> None:
        """Record which parameters got a nonzero gradient in this step (call after ``backward``)."""
        flags = [
            p.grad.ne(0).any() if p.grad is not None else torch.zeros((), dtype=torch.bool, device=p.device)
            for _, p in self.params
        ]
        if not flags:
            return
        stacked = torch.stack([f.to(flags[0].device) for f in flags])
        self._nonzero = stacked if self._nonzero is None else self._nonzero | stacked
        self._steps += 1

    @contextlib.contextmanager
    def watch(self) -> Iterator[list[dict[str, Any]]]:
        """Measure the forwards inside the ``with`` (the evaluation); on exit the list it yields holds the health
        rows of the eval (``metric``, ``value`` and extra fields), the gradient interval included, which restarts."""
        sums: dict[int, list[float]] = {i: [0.0, 0.0] for i in range(len(self.blocks))}

        def block_hook(index: int) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                out = output[0] if isinstance(output, (tuple, list)) else output
                if isinstance(out, Tensor) and out.is_floating_point():
                    sums[index][0] += float(out.detach().float().pow(2).sum())
                    sums[index][1] += out.numel()

            return hook

        handles = [b.register_forward_hook(block_hook(i)) for i, b in enumerate(self.blocks)]
        rows: list[dict[str, Any]] = []
        try:
            with SaturationMonitor(self.model) as saturation:
                yield rows
        finally:
            for h in handles:
                h.remove()
        rows += self._saturation_rows(saturation)
        rows += self._hidden_rows(sums)
        rows += self._frozen_rows()

    def _saturation_rows(self, monitor: SaturationMonitor) -> list[dict[str, Any]]:
        counts = monitor.counts()
        if not counts:
            return []
        flat = all_reduce_sum([float(v) for pair in counts.values() for v in pair], self.dist, _device(self.model))
        fractions = {name: flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] else math.nan
                     for i, name in enumerate(counts)}
        rows = [{"metric": f"saturation:{name}", "value": f, "module": name} for name, f in fractions.items()]
        finite = {n: f for n, f in fractions.items() if math.isfinite(f)}
        if finite:
            worst = max(finite, key=lambda n: finite[n])
            rows.append({"metric": "saturation_max", "value": finite[worst], "module": worst})
        return rows

    def _hidden_rows(self, sums: dict[int, list[float]]) -> list[dict[str, Any]]:
        if not sums:
            return []
        flat = all_reduce_sum([v for i in sorted(sums) for v in sums[i]], self.dist, _device(self.model))
        rms = {i + 1: math.sqrt(flat[2 * i] / flat[2 * i + 1]) for i in sorted(sums) if flat[2 * i + 1]}
        if not rms:
            return []
        block = max(rms, key=lambda i: rms[i])
        return [{"metric": "hidden_rms_max", "value": rms[block], "block": block}]

    def _frozen_rows(self) -> list[dict[str, Any]]:
        if self._nonzero is None:
            return []
        nonzero = self._nonzero.tolist()
        frozen = [(n, p) for (n, p), moved in zip(self.params, nonzero) if not moved]
        total = sum(p.numel() for _, p in self.params)
        share = sum(p.numel() for _, p in frozen) / max(total, 1)
        row = {"metric": "frozen_fraction", "value": share, "frozen_tensors": len(frozen), "steps": self._steps,
               "names": [n for n, _ in frozen[:_NAMES_KEPT]]}
        self._nonzero, self._steps = None, 0
        return [row]


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
