"""The one norm walker, :func:`iter_norms`, and the adapter table that gives foreign norms normlab's protocol.

Every tool that looks for norms in a model (fold, recalibration, the batch-statistics monitor, cross-rank sync, the
contract tests) walks it with :func:`iter_norms` and asks each norm what it needs through :func:`norm_protocol`:
``folded_affine()``, ``fold_note()``, ``recalibration_plan()``, ``batch_stat_view()``, ``synced(process_group)``,
``channel_dim`` and ``saturates_inf`` (documented on :class:`normlab.nn._base.NormBase`).

What counts as a norm, decided per class by walking its MRO, nearest class first:

* a class registered with :func:`normlab.registry.register_norm` (its spec); a subclass of a registered class is
  that norm too (``class MyBN(normlab.BatchNorm)`` has BatchNorm's spec and protocol);
* a class in :data:`ADAPTERS`, the one table of foreign norms (``torch.nn``'s here; Hugging Face's are added by
  :mod:`normlab.walk_hf` the first time the walker meets a class defined in ``transformers``), or a subclass of one.

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
optional packages belong in a function that imports the package only when it is installed: :data:`LAZY_ADAPTERS`
maps a top-level package name to a function called once per module of that package whose classes the walker meets,
so normlab never imports the package itself.

An adapter's ``to_normlab`` writes the foreign module as a normlab registry norm (:class:`NormlabForm`): registry
name, constructor arguments and the tensors to copy in, such that :func:`to_normlab` builds a module with the same
forward (bit for bit in float32). :func:`normlab.surgery.swap_norms` reads the source's eps, affine and statistics
from that form.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
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
from normlab.registry import Layout, NormSpec, create_norm

__all__ = [
    "ADAPTERS",
    "LAZY_ADAPTERS",
    "TRAITS",
    "Adapter",
    "ForeignNorm",
    "NormlabForm",
    "foreign_spec",
    "is_norm",
    "iter_norms",
    "norm_protocol",
    "normlab_form",
    "spec_of",
    "to_normlab",
]

#: The traits :func:`iter_norms` filters on (those of :meth:`NormSpec.traits`).
TRAITS = ("layout", "has_running_stats", "batch_dependent", "foldable", "custom_backward")


@dataclass(frozen=True)
class NormlabForm:
    """A norm written as a normlab registry norm: ``create_norm(name, num_features, **kwargs)`` with ``tensors``
    copied into its attributes of those names (parameters and buffers, the source's own tensors, not copies)."""

    name: str
    num_features: int | tuple[int, ...]
    kwargs: dict[str, Any]
    tensors: dict[str, Tensor]


@dataclass(frozen=True)
class Adapter:
    """How a foreign norm class speaks normlab's norm protocol (see the module docstring).

    Attributes:
        spec: its traits (:func:`foreign_spec`).
        channel_dim: the channel axis of its input, or ``f(module) -> int`` where a constructor argument decides it.
        folded_affine: ``f(module) -> FoldedAffine`` for a foldable norm, else ``None``.
        recalibration_plan: ``f(module) -> RecalibrationPlan | None`` for a norm with running statistics.
        batch_stat_view: ``f(module) -> BatchStatView | None`` for a monitored batch-statistic norm.
        synced: ``f(module, process_group) -> nn.Module``, the module to use with cross-rank statistics (a
            replacement, or the module changed in place); ``None``: the norm has no batch statistics to share.
        saturates_inf: ±inf inputs give finite outputs.
        to_normlab: ``f(module) -> NormlabForm``, the module as a normlab norm with the same forward, or ``None``.
    """

    spec: NormSpec
    channel_dim: int | Callable[[Any], int] = -1
    folded_affine: Callable[[Any], FoldedAffine] | None = None
    recalibration_plan: Callable[[Any], RecalibrationPlan | None] | None = None
    batch_stat_view: Callable[[Any], BatchStatView | None] | None = None
    synced: Callable[[Any, Any], nn.Module] | None = None
    saturates_inf: bool = False
    to_normlab: Callable[[Any], NormlabForm] | None = None


def foreign_spec(name: str, cls: type[nn.Module], layout: Layout, **traits: Any) -> NormSpec:
    """The (unregistered) spec of a foreign norm class: ``traits`` as :func:`~normlab.registry.register_norm`'s."""
    return NormSpec(name=name, cls=cls, functional=None, layout=layout, **traits)


class ForeignNorm:
    """A foreign norm module seen through its :class:`Adapter`: the protocol of :class:`NormBase`."""

    def __init__(self, module: nn.Module, adapter: Adapter) -> None:
        self.module = module
        self.adapter = adapter
        cdim = adapter.channel_dim
        self.channel_dim = cdim if isinstance(cdim, int) else cdim(module)
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


def tensors_of(module: nn.Module, *names: str) -> dict[str, Tensor]:
    """``module``'s tensors of those attribute names that are not ``None``."""
    found = {n: getattr(module, n, None) for n in names}
    return {n: t for n, t in found.items() if isinstance(t, Tensor)}


def _shape(normalized_shape: Any) -> int | tuple[int, ...]:
    dims = tuple(int(d) for d in normalized_shape)
    return dims[0] if len(dims) == 1 else dims


def layer_norm_form(m: Any, channel_dim: int = -1) -> NormlabForm:
    """``torch.nn.LayerNorm`` (and subclasses that keep its attributes) as normlab's ``layer_norm``."""
    kwargs: dict[str, Any] = {"eps": float(m.eps), "affine": bool(m.elementwise_affine), "bias": m.bias is not None}
    if channel_dim != -1:
        kwargs["channel_dim"] = channel_dim
    return NormlabForm("layer_norm", _shape(m.normalized_shape), kwargs, tensors_of(m, "weight", "bias"))


def _rms_form(m: nn.RMSNorm) -> NormlabForm:
    shape = _shape(m.normalized_shape)
    if not isinstance(shape, int):
        raise TypeError(f"RMSNorm over several trailing dims {list(m.normalized_shape)} has no normlab form")
    # eps=None is torch.finfo(input dtype).eps at run time: the form fixes it for the parameters' dtype.
    like = m.weight.dtype if m.weight is not None else torch.get_default_dtype()
    eps = float(m.eps) if m.eps is not None else float(torch.finfo(like).eps)
    return NormlabForm("rms_norm", shape, {"eps": eps, "affine": bool(m.elementwise_affine)}, tensors_of(m, "weight"))


def _bn_form(m: _BatchNorm) -> NormlabForm:
    kwargs = {"eps": float(m.eps), "momentum": m.momentum, "affine": bool(m.affine),
              "track_running_stats": bool(m.track_running_stats)}
    stats = tensors_of(m, "weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return NormlabForm("batch_norm", int(m.num_features), kwargs, stats)


def _gn_form(m: nn.GroupNorm) -> NormlabForm:
    kwargs = {"num_groups": int(m.num_groups), "eps": float(m.eps), "affine": bool(m.affine)}
    return NormlabForm("group_norm", int(m.num_channels), kwargs, tensors_of(m, "weight", "bias"))


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
        to_normlab=_bn_form,
    ),
    # InstanceNorm1d/2d/3d: per-sample statistics (running ones only with track_running_stats, as normlab's).
    _InstanceNorm: Adapter(_torch("InstanceNorm", _InstanceNorm, "channel_first"), channel_dim=1),
    nn.GroupNorm: Adapter(_torch("GroupNorm", nn.GroupNorm, "channel_first"), channel_dim=1, to_normlab=_gn_form),
    nn.LocalResponseNorm: Adapter(_torch("LocalResponseNorm", nn.LocalResponseNorm, "channel_first"), channel_dim=1),
    nn.LayerNorm: Adapter(_torch("LayerNorm", nn.LayerNorm, "token"), to_normlab=layer_norm_form),
    nn.RMSNorm: Adapter(_torch("RMSNorm", nn.RMSNorm, "token"), to_normlab=_rms_form),
}


def _hf_module(module_name: str) -> None:
    from normlab import walk_hf  # imports nothing from transformers that is not imported already

    walk_hf.register_module(module_name)


#: Top-level package -> ``f(module name)`` that adds the :data:`ADAPTERS` entries of that module; called once per
#: module, the first time the walker meets a class defined there (the package is imported by then).
LAZY_ADAPTERS: dict[str, Callable[[str], None]] = {"transformers": _hf_module}
_LAZY_DONE: set[str] = set()


def _register_lazily(cls: type) -> None:
    for klass in cls.__mro__:
        mod = klass.__module__
        if mod in _LAZY_DONE:
            continue
        hook = LAZY_ADAPTERS.get(mod.partition(".")[0])
        if hook is not None:
            _LAZY_DONE.add(mod)
            hook(mod)


def _lookup(cls: type) -> NormSpec | Adapter | None:
    """The nearest class of ``cls``'s MRO that is a registered norm (its spec) or an adapter key (its adapter)."""
    _register_lazily(cls)
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


def normlab_form(module: nn.Module) -> NormlabForm:
    """``module`` written as a normlab registry norm (see :class:`NormlabForm`).

    normlab norms give their own registry name and constructor call; foreign norms their adapter's ``to_normlab``.

    Raises:
        TypeError: ``module`` is not a norm, or a foreign norm whose adapter has no normlab form.
    """
    proto = norm_protocol(module)
    if isinstance(proto, ForeignNorm):
        if proto.adapter.to_normlab is None:
            raise TypeError(
                f"{type(module).__name__} ({proto.adapter.spec.name}) has no normlab form: its adapter in "
                "normlab.walk.ADAPTERS sets no to_normlab"
            )
        return proto.adapter.to_normlab(module)
    spec = spec_of(module)
    assert spec is not None
    args, kwargs = getattr(module, "_ctor_args", ((module.num_features,), {}))
    bound = inspect.signature(type(module)).bind(*args, **kwargs).arguments
    var_kw = [p.name for p in inspect.signature(type(module)).parameters.values() if p.kind is p.VAR_KEYWORD]
    for name in var_kw:
        bound.update(bound.pop(name, {}))
    first, *_ = bound
    num_features = bound.pop(first)
    for name in ("device", "dtype"):
        bound.pop(name, None)
    tensors = {n: t for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]}
    return NormlabForm(spec.name, num_features, dict(bound), tensors)


def to_normlab(module: nn.Module) -> nn.Module:
    """A normlab registry norm with ``module``'s forward: :func:`normlab_form` built, with copies of its
    tensors (same device, dtypes and ``requires_grad``) and its train/eval flag.

    >>> ln = nn.LayerNorm(8, eps=1e-6)
    >>> to_normlab(ln)
    LayerNorm(8, eps=1e-06)

    Raises:
        TypeError: as :func:`normlab_form`.
    """
    form = normlab_form(module)
    like = next(iter(form.tensors.values()), None)
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype if like.is_floating_point() else None}
    out = create_norm(form.name, form.num_features, **form.kwargs, **factory)  # type: ignore[arg-type]
    with torch.no_grad():
        for name, src in form.tensors.items():
            dst = getattr(out, name)
            if not isinstance(dst, Tensor) or dst.shape != src.shape:
                raise TypeError(f"{type(module).__name__}: its {name} {tuple(src.shape)} has no place in {out!r}")
            if isinstance(dst, nn.Parameter):
                out._parameters[name] = nn.Parameter(src.detach().clone(), requires_grad=src.requires_grad)
            else:
                dst.copy_(src)
    out.train(module.training)
    return out
