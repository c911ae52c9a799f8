"""Test streams for test-time adaptation: which samples arrive in which batch, in which order, from which domain.

Label orders within a domain (or within the pooled domains of a mixed stream):

* ``"iid"``: a seeded shuffle.
* ``"dirichlet"``: the label-correlated order of NOTE (Gong et al., "NOTE: Robust Continual Test-time Adaptation
  Against Temporal Correlation", NeurIPS 2022, https://arxiv.org/abs/2208.05117), as UnMix-TNS (Tomar et al.,
  ICLR 2024, https://arxiv.org/abs/2401.08328) uses it: after a shuffle, every class is split over ``J`` = number of
  classes chunks by proportions ``p ~ Dirichlet(δ·1_J)`` (chunks already holding ``N/J`` samples get none), the
  whole draw is repeated until every chunk holds at least 10 samples, and chunk after chunk is emitted as
  contiguous single-class pieces in a random class order. Small δ puts each class into few chunks: long runs of one
  class.
* ``"rotta"``: RoTTA's ``LabelDirichletDomainSequence`` (Yuan et al., "Robust Test-Time Adaptation in Dynamic
  Scenarios", CVPR 2023, https://arxiv.org/abs/2303.13899): every class, in the given order (no shuffle), is split
  over ``S`` = min(number of classes, 100) slots by proportions ``Dirichlet(γ·1_S)``; each slot emits its class
  pieces in a random order, slot after slot.

Domain orders (the settings of the test-time-adaptation benchmarks):

* ``"reset"``: domain after domain, and the model is reset to its source state before each
  (:attr:`AdaptationStream.resets` lists the batches before which to reset);
* ``"continual"``: domain after domain with no reset;
* ``"mixed"``: all domains pooled and ordered as one set, so a batch mixes domains.

In the first two a batch never spans two domains (each domain is its own loader, as in the benchmarks; RoTTA's
single loader lets the last batch of a domain run into the next one). The domains come in the order they are given.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "DOMAIN_ORDERS",
    "LABEL_ORDERS",
    "AdaptationStream",
    "StreamBatch",
    "dirichlet_order",
    "make_stream",
    "rotta_order",
]

LABEL_ORDERS: tuple[str, ...] = ("iid", "dirichlet", "rotta")
DOMAIN_ORDERS: tuple[str, ...] = ("reset", "continual", "mixed")

# NOTE's rule: every chunk of the Dirichlet order holds at least this many samples.
MIN_CHUNK = 10


class StreamBatch(NamedTuple):
    """One batch of a stream.

    Attributes:
        x: the samples, ``(B, ...)``.
        y: their labels, ``(B,)``.
        domain: ``(B,)`` int64, each sample's position in :attr:`AdaptationStream.domains`.
    """

    x: torch.Tensor
    y: torch.Tensor
    domain: torch.Tensor


@dataclass(frozen=True, eq=False)
class AdaptationStream:
    """A built test stream; iterate it for :class:`StreamBatch` es (it can be iterated any number of times and
    always yields the same batches). Build it with :func:`make_stream`.

    Attributes:
        domains: the domain keys, in stream order; ``StreamBatch.domain`` indexes this.
        order: ``"reset"``, ``"continual"`` or ``"mixed"``.
        labels: ``"iid"``, ``"dirichlet"`` or ``"rotta"``.
        batch_indices: per batch, the indices of its samples in the pool (the domains' samples concatenated in
            ``domains`` order).
        resets: indices of the batches before which the model is to be reset to its source state: the first batch
            of every domain under ``"reset"``, none otherwise.
    """

    domains: tuple[Hashable, ...]
    order: str
    labels: str
    batch_indices: tuple[torch.Tensor, ...]
    resets: tuple[int, ...]
    _x: torch.Tensor
    _y: torch.Tensor
    _domain: torch.Tensor

    def __len__(self) -> int:
        return len(self.batch_indices)

    def __iter__(self) -> Iterator[StreamBatch]:
        for idx in self.batch_indices:
            yield StreamBatch(self._x[idx], self._y[idx], self._domain[idx])

    @property
    def num_samples(self) -> int:
        return sum(len(i) for i in self.batch_indices)


def _num_classes_of(labels: np.ndarray, num_classes: int | None) -> int:
    k = int(labels.max()) + 1 if len(labels) else 0
    if num_classes is None:
        return k
    if k > num_classes:
        raise ValueError(f"num_classes={num_classes} but the labels go up to {k - 1}")
    return num_classes


def _split_by(proportions: np.ndarray, members: np.ndarray) -> list[np.ndarray]:
    """Cut ``members`` at ``floor(cumsum(proportions) · n)`` (the last cut left out): one piece per proportion."""
    cuts = (np.cumsum(proportions) * len(members)).astype(np.int64)[:-1]
    return np.split(members, cuts)


def _dirichlet_chunks(
    labels: np.ndarray, delta: float, num_classes: int, rng: np.random.Generator, max_attempts: int
) -> list[list[np.ndarray]]:
    """NOTE's chunking of positions ``0..N-1`` by label: ``pieces[j][k]`` = the positions of class ``k`` in chunk
    ``j``. The whole draw is repeated until every chunk holds at least ``MIN_CHUNK`` samples."""
    n, chunks = len(labels), num_classes
    smallest = 0
    for _ in range(max_attempts):
        pieces: list[list[np.ndarray]] = [[] for _ in range(chunks)]
        sizes = np.zeros(chunks, dtype=np.int64)
        for k in range(num_classes):
            members = np.flatnonzero(labels == k)
            if len(members) == 0:  # an absent class (num_classes > max label + 1) adds nothing anywhere
                for j in range(chunks):
                    pieces[j].append(members)
                continue
            members = members[rng.permutation(len(members))]
            p = np.zeros(chunks)
            while p.sum() == 0:  # redraw when all mass sits on full chunks (NaNs in the reference code)
                # a chunk counts as full once it holds N/J samples, checked before this class is added
                p = rng.dirichlet(np.full(chunks, delta)) * (sizes < n / chunks)
            for j, piece in enumerate(_split_by(p / p.sum(), members)):
                pieces[j].append(piece)
                sizes[j] += len(piece)
        smallest = int(sizes.min())
        if smallest >= MIN_CHUNK:
            return pieces
    raise ValueError(
        f"dirichlet order: no draw in {max_attempts} attempts gave every one of the {chunks} chunks >= {MIN_CHUNK} "
        f"samples (delta={delta}, {n} samples, last draw's smallest chunk {smallest}); a larger delta or more samples "
        "per class make it likelier"
    )


def _check_dirichlet_feasible(n: int, num_classes: int, delta: float, where: str) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 0 or not np.isfinite(delta):
        raise ValueError(f"{where}: expected delta to be a finite float > 0, got {delta!r}")
    if n < MIN_CHUNK * num_classes:
        raise ValueError(
            f"{where}: the Dirichlet order cuts {n} samples into {num_classes} chunks (one per class) of at most "
            f"{n / max(num_classes, 1):.1f} samples, but every chunk needs >= {MIN_CHUNK}: it takes >= "
            f"{MIN_CHUNK * num_classes} samples"
        )


def dirichlet_order(
    labels: torch.Tensor | np.ndarray,
    *,
    delta: float,
    seed: int | np.random.Generator = 0,
    num_classes: int | None = None,
    max_attempts: int = 1000,
) -> np.ndarray:
    """NOTE / UnMix-TNS label-correlated order of ``labels`` (see the module docstring).

    Args:
        labels: ``(N,)`` integer labels ``0..K-1``.
        delta: the Dirichlet concentration δ > 0 (0.1 for 10 classes, 0.01 for 100 or 1000 in UnMix-TNS).
        seed: seed (or generator) of the initial shuffle and every draw.
        num_classes: ``K`` (the number of chunks); default ``max(labels) + 1``, as the reference code.
        max_attempts: how many whole draws to try before giving up (the reference code gives up after 120 s).

    Returns:
        A permutation of ``0..N-1``: the stream order.

    Raises:
        ValueError: ``N < 10·K`` (some chunk must then hold fewer than 10 samples), or no draw succeeded.
    """
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).reshape(-1)
    k = _num_classes_of(lab, num_classes)
    _check_dirichlet_feasible(len(lab), k, delta, "dirichlet_order")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    shuffled = rng.permutation(len(lab))
    pieces = _dirichlet_chunks(lab[shuffled], float(delta), k, rng, max_attempts)
    order: list[np.ndarray] = []
    for chunk in pieces:
        for cls in rng.permutation(k):
            order.append(chunk[cls])
    return shuffled[np.concatenate(order)] if order else shuffled


def rotta_order(
    labels: torch.Tensor | np.ndarray,
    *,
    gamma: float,
    seed: int | np.random.Generator = 0,
    num_classes: int | None = None,
) -> np.ndarray:
    """RoTTA's label-correlated order of one domain's ``labels`` (see the module docstring).

    Args:
        labels: ``(N,)`` integer labels ``0..K-1``, in the order the domain holds them (not shuffled first).
        gamma: the Dirichlet concentration γ > 0 (RoTTA: 0.1).
        seed: seed (or generator) of the draws.
        num_classes: ``K``; default ``max(labels) + 1``. The number of slots is ``min(K, 100)``.

    Returns:
        A permutation of ``0..N-1``.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0 or not np.isfinite(gamma):
        raise ValueError(f"rotta_order: expected gamma to be a finite float > 0, got {gamma!r}")
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).reshape(-1)
    k = _num_classes_of(lab, num_classes)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    slots = min(k, 100)
    proportions = rng.dirichlet(np.full(slots, float(gamma)), size=k) if k else np.zeros((0, 0))
    slot_pieces: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for cls in range(k):
        for s, piece in enumerate(_split_by(proportions[cls], np.flatnonzero(lab == cls))):
            slot_pieces[s].append(piece)
    order = [pieces[i] for pieces in slot_pieces for i in rng.permutation(len(pieces))]
    return np.concatenate(order) if order else np.arange(len(lab))


def _check_domains(domains: object) -> tuple[list[Hashable], list[torch.Tensor], list[torch.Tensor]]:
    if not isinstance(domains, Mapping) or not domains:
        raise TypeError(f"make_stream: expected domains to be a non-empty mapping key -> (x, y), got {domains!r:.80}")
    keys: list[Hashable] = []
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for key, pair in domains.items():
        if not (isinstance(pair, Sequence) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
            raise TypeError(f"make_stream: expected domains[{key!r}] to be a pair of tensors (x, y), got {pair!r:.80}")
        x, y = pair
        if y.ndim != 1 or len(x) != len(y) or y.is_floating_point() or y.is_complex():
            raise ValueError(
                f"make_stream: expected domains[{key!r}] = (x of shape (N, ...), integer y of shape (N,)), got x of "
                f"shape {tuple(x.shape)} and y of shape {tuple(y.shape)} and dtype {y.dtype}"
            )
        if xs and (x.shape[1:] != xs[0].shape[1:] or x.dtype != xs[0].dtype):
            raise ValueError(
                f"make_stream: every domain needs samples of one shape and dtype; domains[{keys[0]!r}] has "
                f"{tuple(xs[0].shape[1:])} {xs[0].dtype}, domains[{key!r}] has {tuple(x.shape[1:])} {x.dtype}"
            )
        if len(y) == 0:
            raise ValueError(f"make_stream: domains[{key!r}] has no samples")
        if int(y.min()) < 0:
            raise ValueError(f"make_stream: expected labels >= 0, domains[{key!r}] has {int(y.min())}")
        keys.append(key)
        xs.append(x)
        ys.append(y)
    return keys, xs, ys


def _check_options(batch_size: object, order: object, labels: object, delta: object, gamma: object) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"make_stream: expected batch_size to be an int >= 1, got {batch_size!r}")
    if order not in DOMAIN_ORDERS:
        raise ValueError(f"make_stream: expected order to be one of {DOMAIN_ORDERS}, got {order!r}")
    if labels not in LABEL_ORDERS:
        raise ValueError(f"make_stream: expected labels to be one of {LABEL_ORDERS}, got {labels!r}")
    if delta is not None and labels != "dirichlet":
        raise ValueError(f"make_stream: delta applies to labels='dirichlet' only, got delta={delta!r} with {labels=!r}")
    if gamma is not None and labels != "rotta":
        raise ValueError(f"make_stream: gamma applies to labels='rotta' only, got gamma={gamma!r} with {labels=!r}")


def _label_order(
    lab: np.ndarray,
    labels: str,
    delta: float | None,
    gamma: float | None,
    rng: np.random.Generator,
    num_classes: int | None,
    where: str,
) -> np.ndarray:
    """The permutation of one ordered set (a domain, or the mixed pool) by the label order ``labels``."""
    if labels == "iid":
        return rng.permutation(len(lab))
    if labels == "dirichlet":
        d = 0.1 if delta is None else delta
        _check_dirichlet_feasible(len(lab), _num_classes_of(lab, num_classes), d, f"make_stream ({where})")
        return dirichlet_order(lab, delta=d, seed=rng, num_classes=num_classes)
    return rotta_order(lab, gamma=0.1 if gamma is None else gamma, seed=rng, num_classes=num_classes)


def make_stream(
    domains: Mapping[Hashable, tuple[torch.Tensor, torch.Tensor]],
    *,
    batch_size: int,
    order: str = "continual",
    labels: str = "iid",
    delta: float | None = None,
    gamma: float | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    drop_last: bool = False,
) -> AdaptationStream:
    """Build a test stream over ``domains`` (see the module docstring for the orders).

    Args:
        domains: ``{key: (x, y)}``, in stream order; ``x`` is ``(N, ...)`` (the same trailing shape and dtype in
            every domain), ``y`` is ``(N,)`` integer labels.
        batch_size: samples per batch; batches are consecutive slices of the ordered samples.
        order: ``"reset"``, ``"continual"`` or ``"mixed"``.
        labels: ``"iid"``, ``"dirichlet"`` (NOTE / UnMix-TNS, δ) or ``"rotta"`` (RoTTA, γ).
        delta: δ of ``labels="dirichlet"`` (default 0.1); an error with another label order.
        gamma: γ of ``labels="rotta"`` (default 0.1); an error with another label order.
        seed: seeds every shuffle and draw; domain ``i`` draws from its own generator ``(seed, i)``.
        num_classes: number of classes (chunks, slots); default ``max(y) + 1`` of each ordered set.
        drop_last: drop a domain's (mixed: the pool's) last batch when it is short.

    Returns:
        The :class:`AdaptationStream`; every sample appears exactly once unless ``drop_last`` drops it.

    Raises:
        ValueError: an infeasible Dirichlet order (a domain with fewer than ``10·K`` samples), or a bad argument.

    Example:
        >>> x, y = torch.randn(200, 3), torch.arange(200) % 10
        >>> stream = make_stream({"a": (x, y), "b": (x, y)}, batch_size=64, labels="dirichlet", delta=0.1)
        >>> len(stream), stream.domains
        (8, ('a', 'b'))
    """
    _check_options(batch_size, order, labels, delta, gamma)
    keys, xs, ys = _check_domains(domains)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"make_stream: expected seed to be an int >= 0, got {seed!r}")
    offsets = np.cumsum([0] + [len(y) for y in ys])
    pool_y = torch.cat(ys).cpu().numpy().astype(np.int64)
    if order == "mixed":  # the pool is one set; its generator is (seed, number of domains), unused by any domain
        groups = [(np.arange(offsets[-1]), np.random.default_rng([seed, len(keys)]), "the mixed pool")]
    else:
        groups = [
            (np.arange(offsets[i], offsets[i + 1]), np.random.default_rng([seed, i]), f"domain {key!r}")
            for i, key in enumerate(keys)
        ]
    batches: list[torch.Tensor] = []
    resets: list[int] = []
    for members, rng, where in groups:
        perm = _label_order(pool_y[members], labels, delta, gamma, rng, num_classes, where)
        ordered = torch.from_numpy(members[perm])
        if order == "reset":
            resets.append(len(batches))
        for start in range(0, len(ordered), batch_size):
            if drop_last and start + batch_size > len(ordered):
                break
            batches.append(ordered[start : start + batch_size])
    domain_ids = torch.repeat_interleave(torch.arange(len(keys)), torch.tensor([len(y) for y in ys]))
    return AdaptationStream(
        domains=tuple(keys),
        order=order,
        labels=labels,
        batch_indices=tuple(batches),
        resets=tuple(resets),
        _x=torch.cat(xs),
        _y=torch.cat(ys),
        _domain=domain_ids,
    )
