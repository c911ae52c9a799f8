"""Online evaluation of an adapted model on a test stream (:func:`normlab.data.streams.make_stream`): every batch is
predicted once, in stream order, with the model reset to its source state where the stream says so (the
``reset`` order: before every domain), as in the TTA benchmarks' protocol (Wang et al., Tent, ICLR 2021,
https://arxiv.org/abs/2006.10726, §4; the UnMix-TNS / ``test-time-adaptation`` settings).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from normlab.data.streams import AdaptationStream
from normlab.tta.adapted import Adapted

__all__ = ["StreamResult", "run_stream"]


@dataclass(frozen=True)
class StreamResult:
    """Predictions of one pass over a stream.

    Attributes:
        predictions: ``(N,)`` predicted classes, in stream order.
        labels: ``(N,)`` the true labels.
        domain: ``(N,)`` each sample's index into ``domains``.
        domains: the stream's domain keys.
    """

    predictions: Tensor
    labels: Tensor
    domain: Tensor
    domains: tuple[Hashable, ...]

    def errors(self) -> dict[Hashable, float]:
        """Error (%) per domain."""
        wrong = (self.predictions != self.labels).double()
        return {key: 100.0 * wrong[self.domain == i].mean().item() for i, key in enumerate(self.domains)
                if bool((self.domain == i).any())}

    def mean_error(self) -> float:
        """The mean of the per-domain errors (%), the benchmarks' summary number."""
        errs = list(self.errors().values())
        return sum(errs) / len(errs) if errs else float("nan")


def run_stream(adapted: Adapted, stream: AdaptationStream, *, reset_first: bool = True) -> StreamResult:
    """Predict every batch of ``stream`` once, adapting online; reset before the batches in ``stream.resets``.

    Args:
        adapted: the model under adaptation (:func:`~normlab.tta.adapt`).
        stream: the test stream.
        reset_first: reset ``adapted`` to its source state before the first batch (a fresh run).
    """
    if not isinstance(adapted, Adapted):
        raise TypeError(f"run_stream: expected adapted to be a normlab.tta.Adapted, got {type(adapted).__name__}")
    if not isinstance(stream, AdaptationStream):
        raise TypeError(f"run_stream: expected stream to be an AdaptationStream, got {type(stream).__name__}")
    if reset_first:
        adapted.reset()
    resets = set(stream.resets)
    preds, labels, domains = [], [], []
    for i, batch in enumerate(stream):
        if i in resets:
            adapted.reset()
        preds.append(adapted(batch.x).argmax(-1).cpu())
        labels.append(batch.y.cpu())
        domains.append(batch.domain.cpu())
    empty = torch.zeros(0, dtype=torch.long)
    return StreamResult(
        torch.cat(preds) if preds else empty, torch.cat(labels) if labels else empty,
        torch.cat(domains) if domains else empty, tuple(stream.domains),
    )
