"""The norm registry: one typed entry (:class:`NormSpec`) per normalization method.

Every norm in normlab registers itself once with :func:`register_norm`. Other parts of the library
(surgery, test-time adaptation, the lab, the contract tests) select norms by the traits recorded here
instead of ``isinstance`` chains, so a new norm is picked up everywhere without edits elsewhere.

Lookup is forgiving: ``"RMSNorm"``, ``"rmsnorm"``, ``"rms_norm"`` and ``"rms-norm"`` all resolve to the
same entry. An unknown name raises :class:`KeyError` naming the closest matches and what is available.

Registration is the only step that makes a norm part of normlab: importing :mod:`normlab.nn` imports every module
file in it, and the exports of :mod:`normlab.nn`, :mod:`normlab.functional` and the ``normlab`` namespace are
derived from the norms registered there (:func:`norms_defined_in`).

Float64 references register separately, by norm name, with :func:`register_reference` from
:mod:`normlab.testing`; :attr:`NormSpec.reference` imports that package on first use, so importing
:mod:`normlab.nn` never imports the test helpers. :func:`temporary` scopes registrations (tests, notebooks).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from torch import nn

__all__ = [
    "Layout",
    "NormSpec",
    "Paper",
    "Registrations",
    "create_norm",
    "get_norm",
    "list_norms",
    "normalize_name",
    "norms_defined_in",
    "register_norm",
    "register_reference",
    "temporary",
]

Layout = Literal["token", "channel_first", "any"]
_LAYOUTS = ("token", "channel_first", "any")

M = TypeVar("M", bound=type[nn.Module])
R = TypeVar("R", bound=Callable[..., Any])

# Where the float64 references live; imported the first time a reference is looked up.
_REFERENCE_PACKAGE = "normlab.testing"


@dataclass(frozen=True)
class Paper:
    """A paper a norm implements: its title and a link (arXiv where one exists)."""

    title: str
    url: str

    def __str__(self) -> str:
        return f"{self.title} <{self.url}>"


@dataclass(frozen=True)
class NormSpec:
    """Registry entry of one normalization method.

    Attributes:
        name: canonical registry key (snake_case).
        cls: the ``nn.Module`` class; ``cls(num_features, **kwargs)`` builds it.
        functional: the pure tensor op the module calls (``None`` for compositions without one).
        layout: where the channel axis is by default: ``"token"`` (last axis, ``(*, C)``),
            ``"channel_first"`` (``(N, C, *)``) or ``"any"`` (``channel_dim=`` picks).
        has_running_stats: keeps running statistics used in eval mode.
        batch_dependent: in train mode an output depends on other samples of the batch.
        foldable: in eval mode the norm is a fixed per-channel affine that folds into a linear layer.
        custom_backward: uses a hand-written backward (an ``autograd.Function``) instead of autograd's.
        paper: the paper the definition comes from.
        aliases: extra names that resolve to this entry.
        samples: constructor-keyword variants the contract tests exercise (``{}`` is always included).
        description: one line for ``normlab ls``.

    The float64 reference is not a field: :attr:`reference` looks it up by name when it is first needed.
    """

    name: str
    cls: type[nn.Module]
    functional: Callable[..., Any] | None
    layout: Layout
    has_running_stats: bool = False
    batch_dependent: bool = False
    foldable: bool = False
    custom_backward: bool = False
    paper: Paper | None = None
    aliases: tuple[str, ...] = ()
    samples: tuple[dict[str, Any], ...] = field(default_factory=lambda: ({},))
    description: str = ""

    @property
    def reference(self) -> Callable[..., Any]:
        """The float64 reference ``reference(module, x, mask=None) -> Tensor``, written independently of
        ``functional`` and registered under this norm's name with :func:`register_reference` (tests, benchmarks).

        The first lookup imports :mod:`normlab.testing`, where normlab's references register themselves.

        Raises:
            KeyError: no reference is registered for this norm.
        """
        fn = _REFERENCES.get(self.name)
        if fn is None:
            _load_references()
            fn = _REFERENCES.get(self.name)
        if fn is None:
            raise KeyError(
                f"norm {self.name!r} has no float64 reference; register one with "
                f"@register_reference({self.name!r}) in a module of {_REFERENCE_PACKAGE} "
                "(CONTRIBUTING.md, 'Adding a norm')"
            )
        return fn

    def traits(self) -> dict[str, Any]:
        """The selectable traits as a plain dict (what :func:`list_norms` filters on)."""
        return {
            "layout": self.layout,
            "has_running_stats": self.has_running_stats,
            "batch_dependent": self.batch_dependent,
            "foldable": self.foldable,
            "custom_backward": self.custom_backward,
        }


_REGISTRY: dict[str, NormSpec] = {}
_NAME_INDEX: dict[str, str] = {}  # normalized name -> canonical key
_REFERENCES: dict[str, Callable[..., Any]] = {}  # canonical key -> float64 reference


def normalize_name(name: str) -> str:
    """Fold case and drop ``-``/``_``/spaces, so ``"RMSNorm"``, ``"rms_norm"`` and ``"rms-norm"`` all match."""
    return re.sub(r"[\s_\-]+", "", name).lower()


def register_norm(
    name: str,
    *,
    functional: Callable[..., Any] | None,
    layout: Layout,
    reference: Callable[..., Any] | None = None,
    has_running_stats: bool = False,
    batch_dependent: bool = False,
    foldable: bool = False,
    custom_backward: bool = False,
    paper: Paper | None = None,
    aliases: Iterable[str] = (),
    samples: Iterable[dict[str, Any]] = (),
    description: str = "",
) -> Callable[[M], M]:
    """Class decorator that registers a norm module under ``name`` (and ``aliases``).

    The class name is registered as an alias as well, so ``get_norm("RMSNorm")`` works. The arguments other than
    ``reference`` become the :class:`NormSpec` fields of the same name.

    ``reference`` is for norms defined outside normlab that bring their own float64 reference; normlab's norms
    leave it out and register theirs by name from :mod:`normlab.testing` (:func:`register_reference`), so that
    :mod:`normlab.nn` does not import the test helpers.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"register_norm: layout must be one of {_LAYOUTS}, got {layout!r}")

    def decorator(cls: M) -> M:
        sample_list = [dict(s) for s in samples]
        if {} not in sample_list:
            sample_list.insert(0, {})
        spec = NormSpec(
            name=name,
            cls=cls,
            functional=functional,
            layout=layout,
            has_running_stats=has_running_stats,
            batch_dependent=batch_dependent,
            foldable=foldable,
            custom_backward=custom_backward,
            paper=paper,
            aliases=tuple(aliases),
            samples=tuple(sample_list),
            description=description or (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else description,
        )
        _add(spec)
        if reference is not None:
            _add_reference(name, reference)
        return cls

    return decorator


def _add(spec: NormSpec) -> None:
    """Enter ``spec`` under its name, class name and aliases, refusing names another norm holds."""
    name, cls = spec.name, spec.cls
    if name in _REGISTRY and _REGISTRY[name].cls is not cls:
        raise ValueError(f"register_norm: name {name!r} is already registered to {_REGISTRY[name].cls.__name__}")
    keys = {normalize_name(k) for k in (name, cls.__name__, *spec.aliases)}
    for key in keys:
        owner = _NAME_INDEX.get(key)
        if owner is not None and owner != name:
            raise ValueError(f"register_norm: alias {key!r} of {name!r} already names {owner!r}")
    _REGISTRY[name] = spec
    for key in keys:
        _NAME_INDEX[key] = name
    cls.norm_spec = spec  # type: ignore[attr-defined]


def _add_reference(name: str, fn: Callable[..., Any]) -> None:
    if not callable(fn):
        raise TypeError(f"register_reference: expected a callable reference for {name!r}, got {type(fn).__name__}")
    owner = _REFERENCES.get(name)
    if owner is not None and owner is not fn:
        raise ValueError(
            f"register_reference: norm {name!r} already has a float64 reference "
            f"({owner.__module__}.{owner.__qualname__}); got {fn.__module__}.{fn.__qualname__}"
        )
    _REFERENCES[name] = fn


def register_reference(*names: str) -> Callable[[R], R]:
    """Decorator that registers a float64 reference for the norms ``names`` (any spelling :func:`get_norm` takes).

    A reference has the signature ``reference(module, x, mask=None) -> Tensor``: it reads the module's parameters,
    buffers and ``training`` flag, computes in float64 from the paper's definition (not from the functional op)
    and updates no state. normlab's references live in :mod:`normlab.testing`; :attr:`NormSpec.reference`
    finds them. The norms must be registered first.

    >>> @register_reference("rms_norm", "prms_norm")  # doctest: +SKIP
    ... def rms_norm(m, x, mask=None): ...

    Raises:
        TypeError: no name, or a name that is not a string.
        KeyError: a name that is no registered norm (with the closest names).
        ValueError: the norm already has a different reference.
    """
    if not names:
        raise TypeError("register_reference: expected at least one norm name, got none")
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"register_reference: expected norm names (str), got {type(n).__name__}")

    def decorator(fn: R) -> R:
        package = sys.modules.get("normlab.nn")
        if package is not None and not hasattr(package, "__all__"):  # set last by normlab.nn's __init__
            raise ImportError(
                f"register_reference: {fn.__module__} registers a reference while normlab.nn is still being imported; "
                "normlab.nn must not import the references (NormSpec.reference loads them when first used)"
            )
        for n in names:
            try:
                key = get_norm(n).name
            except KeyError as err:
                raise KeyError(f"register_reference: {err.args[0]}") from None
            _add_reference(key, fn)
        return fn

    return decorator


def _load_references() -> None:
    importlib.import_module(_REFERENCE_PACKAGE)  # its modules register every reference on import


class Registrations:
    """The norms and float64 references registered inside one :func:`temporary` block.

    Filled when the block exits; passing it to a later ``temporary(...)`` registers the same objects again for
    that block (the classes keep their identity, so modules built from them still pickle and compare).
    """

    def __init__(self) -> None:
        self.norms: list[NormSpec] = []
        self.references: dict[str, Callable[..., Any]] = {}

    def __repr__(self) -> str:
        return f"Registrations(norms={[s.name for s in self.norms]}, references={sorted(self.references)})"


@contextlib.contextmanager
def temporary(again: Registrations | None = None) -> Iterator[Registrations]:
    """A scope for registrations that must not outlive it; on exit the registry is as it was on entry.

    What the block registered is recorded in the yielded :class:`Registrations`, so it can be made active again
    for a later block with ``temporary(that_record)``. normlab's own norms and references are loaded before the
    block starts, so the block can neither undo them nor hide them.

    >>> with temporary() as toy:  # doctest: +SKIP
    ...     import my_toy_norm  # its @register_norm / @register_reference land in the registry ...
    >>> "toy_norm" in {s.name for s in list_norms()}  # doctest: +SKIP
    False
    >>> with temporary(toy):  # doctest: +SKIP
    ...     get_norm("toy_norm").reference  # ... and are back, the same objects, inside this block
    """
    _ensure_loaded()
    _load_references()
    saved_norms, saved_names, saved_refs = dict(_REGISTRY), dict(_NAME_INDEX), dict(_REFERENCES)
    record = Registrations()
    try:
        if again is not None:
            for spec in again.norms:
                _add(spec)
            for name, fn in again.references.items():
                _add_reference(name, fn)
        yield record
    finally:
        record.norms = [s for n, s in _REGISTRY.items() if saved_norms.get(n) is not s]
        record.references = {n: f for n, f in _REFERENCES.items() if saved_refs.get(n) is not f}
        for live, saved in ((_REGISTRY, saved_norms), (_NAME_INDEX, saved_names), (_REFERENCES, saved_refs)):
            live.clear()
            live.update(saved)  # type: ignore[arg-type]


def _ensure_loaded() -> None:
    # Registration happens when normlab.nn is imported; importing it here keeps
    # `from normlab.registry import get_norm` usable on its own.
    import normlab.nn  # noqa: F401


def get_norm(name: str | type[nn.Module]) -> NormSpec:
    """Return the :class:`NormSpec` for a registry name, alias or registered class.

    Raises:
        KeyError: unknown name, with the closest names and the full list.
        TypeError: ``name`` is neither a string nor a registered class.
    """
    _ensure_loaded()
    if isinstance(name, type):
        spec = getattr(name, "norm_spec", None)
        # A class whose registration ended with a temporary() block keeps the attribute but is no norm any more.
        if isinstance(spec, NormSpec) and spec.cls is name and _REGISTRY.get(spec.name) is spec:
            return spec
        raise KeyError(f"class {name.__name__} is not a registered norm; available: {', '.join(sorted(_REGISTRY))}")
    if not isinstance(name, str):
        raise TypeError(f"get_norm: expected a norm name (str) or a registered class, got {type(name).__name__}")
    key = _NAME_INDEX.get(normalize_name(name))
    if key is None:
        choices = sorted(set(_NAME_INDEX) | set(_REGISTRY))
        close = difflib.get_close_matches(normalize_name(name), choices, n=3, cutoff=0.5)
        close_keys = list(dict.fromkeys(_NAME_INDEX.get(c, c) for c in close))  # closest first, as difflib ranks
        hint = f"did you mean {', '.join(repr(c) for c in close_keys)}? " if close_keys else ""
        raise KeyError(f"unknown norm {name!r}; {hint}available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def create_norm(name: str | type[nn.Module] | Callable[..., nn.Module], num_features: int, **kwargs: Any) -> nn.Module:
    """Build a norm from a registry name, a class or a partial: ``create_norm("rms_norm", 768, eps=1e-6)``.

    A ``functools.partial`` (or any callable that is not a registered class) is called as
    ``factory(num_features, **kwargs)``.
    """
    if isinstance(name, str):
        return get_norm(name).cls(num_features, **kwargs)
    if isinstance(name, functools.partial) or callable(name):
        return name(num_features, **kwargs)
    raise TypeError(f"create_norm: name must be a registry key, a class or a partial, got {type(name).__name__}")


def list_norms(**traits: Any) -> list[NormSpec]:
    """Registered norms sorted by name, optionally filtered by traits.

    >>> [s.name for s in list_norms(has_running_stats=True)]  # doctest: +SKIP
    ['batch_norm', ...]

    Raises:
        KeyError: a trait that does not exist.
    """
    _ensure_loaded()
    known = ("layout", "has_running_stats", "batch_dependent", "foldable", "custom_backward")
    for key in traits:
        if key not in known:
            raise KeyError(f"list_norms: unknown trait {key!r}; traits are: {', '.join(known)}")
    out = []
    for name in sorted(_REGISTRY):
        spec = _REGISTRY[name]
        values = spec.traits()
        if all(values[k] == v for k, v in traits.items()):
            out.append(spec)
    return out


def norms_defined_in(package: str) -> list[NormSpec]:
    """Registered norms whose class is defined in ``package`` or below it (a dotted name), sorted by name.

    The package namespaces are derived from this: ``norms_defined_in("normlab.nn")`` is what normlab itself
    registers, without norms a user or a test registered from elsewhere.
    """
    prefix = package + "."
    return [s for s in list_norms() if s.cls.__module__ == package or s.cls.__module__.startswith(prefix)]
