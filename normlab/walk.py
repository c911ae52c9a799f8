"""The one norm walker, :func:`iter_norms`, and the adapter table that gives foreign norms normlab's protocol.

Every tool that looks for norms in a model (fold, recalibration, the batch-statistics monitor, cross-rank sync, the
contract tests) walks it with :func:`iter_norms` and asks each norm what it needs through :func:`norm_protocol`:
``folded_affine()``, ``fold_note()``, ``recalibration_plan()``, ``batch_stat_view()``, ``synced(process_group)``,
``channel_dim`` and ``saturates_inf`` (documented on :class:`normlab.nn._base.NormBase`).

What counts as a norm, decided per class by walking its MRO, nearest class first:

* a class registered with :func:`normlab.registry.register_norm` (its spec); a subclass of a registered class is
  that norm too (``class MyBN(normlab.BatchNorm)`` has BatchNorm's spec and protocol);
* a class in :data:`ADAPTERS`, the one table of foreign norms (``torch.nn`` today), or a subclass of one.

normlab's own norms implement the protocol as methods (:class:`~normlab.nn._base.NormBase`); a foreign norm is
wrapped in a :class:`ForeignNorm` that implements it from its :class:`Adapter`.

Adding a foreign family is one table entry. An :class:`Adapter` holds the norm's traits (a :class:`NormSpec` made by
:func:`foreign_spec`, never registered, so ``list_norms`` stays normlab's), its channel axis and the protocol
functions it supports; every function left ``None`` takes the default (not foldable, nothing to recalibrate or
monitor, not synced). Hugging Face's ``LlamaRMSNorm``, for example, is a per-token RMSNorm over the last axis::

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ADAPTERS[LlamaRMSNorm] = Adapter(foreign_spec("transformers.LlamaRMSNorm", LlamaRMSNorm, "token"))

and a BatchNorm-like class with torch's attribute names reuses the BatchNorm functions, as the ``_BatchNorm`` entry
below does (``folded_affine=bn_folded_affine``, ``recalibration_plan=bn_recalibration_plan``, ...). Entries for
optional packages belong in a function that imports the package only when it is installed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normlab.nn._base import (
    BatchStatView,
    FoldedAffine,
    NormBase,
    RecalibrationPlan,
    bn_batch_stat_view,
    bn_folded_affine,
    bn_recalibration_plan,
)
from normlab.nn.batch_norm import BatchNorm
from normlab.registry import Layout, NormSpec

__all__ = [
    "ADAPTERS",
    "TRAITS",
    "Adapter",
    "ForeignNorm",
    "foreign_spec",
    "is_norm",
    "iter_norms",
    "norm_protocol",
    "spec_of",
]

#: The traits :func:`iter_norms` filters on (those of :meth:`NormSpec.traits`).
TRAITS = ("layout", "has_running_stats", "batch_dependent", "foldable", "custom_backward")


@dataclass(frozen=True)
class Adapter:
    """How a foreign norm class speaks normlab's norm protocol (see the module docstring).

    Attributes:
        spec: its traits (:func:`foreign_spec`).
        channel_dim: the channel axis of its input.
        folded_affine: ``f(module) -> FoldedAffine`` for a foldable norm, else ``None``.
        recalibration_plan: ``f(module) -> RecalibrationPlan | None`` for a norm with running statistics.
        batch_stat_view: ``f(module) -> BatchStatView | None`` for a monitored batch-statistic norm.
        synced: ``f(module, process_group) -> nn.Module``, the module to use with cross-rank statistics (a
            replacement, or the module changed in place); ``None``: the norm has no batch statistics to share.
        saturates_inf: ±inf inputs give finite outputs.
    """

    spec: NormSpec
    channel_dim: int = -1
    folded_affine: Callable[[Any], FoldedAffine] | None = None
    recalibration_plan: Callable[[Any], RecalibrationPlan | None] | None = None
    batch_stat_view: Callable[[Any], BatchStatView | None] | None = None
    synced: Callable[[Any, Any], nn.Module] | None = None
    saturates_inf: bool = False


def foreign_spec(name: str, cls: type[nn.Module], layout: Layout, **traits: Any) -> NormSpec:
    """The (unregistered) spec of a foreign norm class: ``traits`` as :func:`~normlab.registry.register_norm`'s."""
    return NormSpec(name=name, cls=cls, functional=None, layout=layout, **traits)


class ForeignNorm:
    """A foreign norm module seen through its :class:`Adapter`: the protocol of :class:`NormBase`."""

    def __init__(self, module: nn.Module, adapter: Adapter) -> None:
        self.module = module
        self.adapter = adapter
        self.channel_dim = adapter.channel_dim
        self.saturates_inf = adapter.saturates_inf

    def folded_affine(self) -> FoldedAffine:
        if self.adapter.folded_affine is None:
            raise TypeError(
                f"{type(self.module).__name__} is not foldable: its eval-mode output is not a fixed per-channel affine"
            )
        return self.adapter.folded_affine(self.module)

    def fold_note(self) -> str | None:
        return None

    def recalibration_plan(self) -> RecalibrationPlan | None:
        if self.adapter.recalibration_plan is not None:
            return self.adapter.recalibration_plan(self.module)
        if self.adapter.spec.has_running_stats:
            raise NotImplementedError(
                f"{type(self.module).__name__} has running statistics but no recalibration rule"
            )
        return None

    def batch_stat_view(self) -> BatchStatView | None:
        return None if self.adapter.batch_stat_view is None else self.adapter.batch_stat_view(self.module)

    def synced(self, process_group: Any = None) -> nn.Module:
        return self.module if self.adapter.synced is None else self.adapter.synced(self.module, process_group)


def _torch(name: str, cls: type[nn.Module], layout: Layout, **traits: Any) -> NormSpec:
    return foreign_spec(f"torch.nn.{name}", cls, layout, **traits)


#: Foreign norm classes, looked up along a module class's MRO (a subclass of a key is covered by its entry).
ADAPTERS: dict[type[nn.Module], Adapter] = {
    # BatchNorm1d/2d/3d and SyncBatchNorm: the same attributes as normlab's BatchNorm, so the same protocol.
    _BatchNorm: Adapter(
        _torch("BatchNorm", _BatchNorm, "channel_first", has_running_stats=True, batch_dependent=True, foldable=True),
        channel_dim=1,
        folded_affine=bn_folded_affine,
        recalibration_plan=bn_recalibration_plan,
        batch_stat_view=functools.partial(bn_batch_stat_view, channel_dim=1),
        synced=BatchNorm.from_torch,
    ),
    # InstanceNorm1d/2d/3d: per-sample statistics (running ones only with track_running_stats, as normlab's).
    _InstanceNorm: Adapter(_torch("InstanceNorm", _InstanceNorm, "channel_first"), channel_dim=1),
    nn.GroupNorm: Adapter(_torch("GroupNorm", nn.GroupNorm, "channel_first"), channel_dim=1),
    nn.LocalResponseNorm: Adapter(_torch("LocalResponseNorm", nn.LocalResponseNorm, "channel_first"), channel_dim=1),
    nn.LayerNorm: Adapter(_torch("LayerNorm", nn.LayerNorm, "token")),
    nn.RMSNorm: Adapter(_torch("RMSNorm", nn.RMSNorm, "token")),
}


def _lookup(cls: type) -> NormSpec | Adapter | None:
    """The nearest class of ``cls``'s MRO that is a registered norm (its spec) or an adapter key (its adapter)."""
    for klass in cls.__mro__:
        spec = klass.__dict__.get("norm_spec")
        if isinstance(spec, NormSpec):
            return spec
        if klass in ADAPTERS:
            return ADAPTERS[klass]
    return None


def spec_of(module: nn.Module) -> NormSpec | None:
    """The spec (traits) of a norm module, or ``None`` when it is not a norm."""
    found = _lookup(type(module))
    return found.spec if isinstance(found, Adapter) else found


def is_norm(module: nn.Module) -> bool:
    """Whether :func:`iter_norms` would see ``module`` as a norm."""
    return _lookup(type(module)) is not None


def norm_protocol(module: nn.Module) -> NormBase | ForeignNorm:
    """The norm protocol of ``module``: the module itself for normlab norms, else a :class:`ForeignNorm`.

    Raises:
        TypeError: ``module`` is not a norm.
    """
    found = _lookup(type(module))
    if found is None:
        raise TypeError(f"{type(module).__name__} is not a norm: neither registered nor in normlab.walk.ADAPTERS")
    if isinstance(module, NormBase):
        return module
    if isinstance(found, NormSpec):  # registered without deriving from NormBase: traits only
        cdim = getattr(module, "channel_dim", 1 if found.layout == "channel_first" else -1)
        found = Adapter(found, channel_dim=int(cdim))
    return ForeignNorm(module, found)


def iter_norms(model: nn.Module, **traits: Any) -> Iterator[tuple[str, nn.Module, NormSpec]]:
    """``(qualified name, module, spec)`` of every norm in ``model``, in ``named_modules()`` order.

    Norms are normlab's (and subclasses of them) and the foreign ones of :data:`ADAPTERS` (``torch.nn`` norms).
    Outermost only: a norm nested in another (PRepBatchNorm's ``norm1`` and ``norm2``) belongs to it and is not
    yielded. ``traits`` filter on the spec as :func:`~normlab.registry.list_norms` does; the outermost rule applies
    before the filter. ``model`` itself is yielded (with the name ``""``) when it is a norm.

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.LayerNorm(8))
    >>> [(name, spec.name) for name, _, spec in iter_norms(net, batch_dependent=True)]
    [('1', 'torch.nn.BatchNorm')]

    Raises:
        KeyError: a trait that does not exist.
    """
    for key in traits:
        if key not in TRAITS:
            raise KeyError(f"iter_norms: unknown trait {key!r}; traits are: {', '.join(TRAITS)}")
    inside: str | None = None
    for name, module in model.named_modules():
        if inside is not None and (inside == "" or name.startswith(inside + ".")):
            continue
        spec = spec_of(module)
        if spec is None:
            continue
        inside = name
        values = spec.traits()
        if all(values[k] == v for k, v in traits.items()):
            yield name, module, spec
