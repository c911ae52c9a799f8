"""The norm registry: one typed entry (:class:`NormSpec`) per normalization method.

Every norm in normlab registers itself once with :func:`register_norm`. Other parts of the library
(surgery, test-time adaptation, the lab, the contract tests) select norms by the traits recorded here
instead of ``isinstance`` chains, so a new norm is picked up everywhere without edits elsewhere.

Lookup is forgiving: ``"RMSNorm"``, ``"rmsnorm"``, ``"rms_norm"`` and ``"rms-norm"`` all resolve to the
same entry. An unknown name raises :class:`KeyError` naming the closest matches and what is available.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from torch import nn

__all__ = [
    "Layout",
    "NormSpec",
    "Paper",
    "create_norm",
    "get_norm",
    "list_norms",
    "normalize_name",
    "register_norm",
]

Layout = Literal["token", "channel_first", "any"]
_LAYOUTS = ("token", "channel_first", "any")

M = TypeVar("M", bound=type[nn.Module])


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
        reference: float64 reference ``reference(module, x, mask=None) -> Tensor`` written
            independently of ``functional``; used by the tests and benchmarks.
        layout: where the channel axis is by default: ``"token"`` (last axis, ``(*, C)``),
            ``"channel_first"`` (``(N, C, *)``) or ``"any"`` (``channel_dim=`` picks).
        has_running_stats: keeps running statistics used in eval mode.
        batch_dependent: in train mode an output depends on other samples of the batch.
        foldable: in eval mode the norm is a fixed per-channel affine that folds into a linear layer.
        custom_backward: uses a hand-written backward (an ``autograd.Function``) instead of autograd's.
        paper: the paper the definition comes from.
        aliases: extra names that resolve to this entry.
        torch_equivalent: ``factory(num_features, kwargs) -> nn.Module | None`` building the
            ``torch.nn`` module whose state dict loads into ours (``None`` where torch has none).
        samples: constructor-keyword variants the contract tests exercise (``{}`` is always included).
        description: one line for ``normlab ls``.
    """

    name: str
    cls: type[nn.Module]
    functional: Callable[..., Any] | None
    reference: Callable[..., Any] | None
    layout: Layout
    has_running_stats: bool = False
    batch_dependent: bool = False
    foldable: bool = False
    custom_backward: bool = False
    paper: Paper | None = None
    aliases: tuple[str, ...] = ()
    torch_equivalent: Callable[[int, dict[str, Any]], nn.Module | None] | None = None
    samples: tuple[dict[str, Any], ...] = field(default_factory=lambda: ({},))
    description: str = ""

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


def normalize_name(name: str) -> str:
    """Fold case and drop ``-``/``_``/spaces, so ``"RMSNorm"``, ``"rms_norm"`` and ``"rms-norm"`` all match."""
    return re.sub(r"[\s_\-]+", "", name).lower()


def register_norm(
    name: str,
    *,
    functional: Callable[..., Any] | None,
    reference: Callable[..., Any] | None,
    layout: Layout,
    has_running_stats: bool = False,
    batch_dependent: bool = False,
    foldable: bool = False,
    custom_backward: bool = False,
    paper: Paper | None = None,
    aliases: Iterable[str] = (),
    torch_equivalent: Callable[[int, dict[str, Any]], nn.Module | None] | None = None,
    samples: Iterable[dict[str, Any]] = (),
    description: str = "",
) -> Callable[[M], M]:
    """Class decorator that registers a norm module under ``name`` (and ``aliases``).

    The class name is registered as an alias as well, so ``get_norm("RMSNorm")`` works.
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
            reference=reference,
            layout=layout,
            has_running_stats=has_running_stats,
            batch_dependent=batch_dependent,
            foldable=foldable,
            custom_backward=custom_backward,
            paper=paper,
            aliases=tuple(aliases),
            torch_equivalent=torch_equivalent,
            samples=tuple(sample_list),
            description=description or (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else description,
        )
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
        return cls

    return decorator


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
        if isinstance(spec, NormSpec) and spec.cls is name:
            return spec
        raise KeyError(f"class {name.__name__} is not a registered norm; available: {', '.join(sorted(_REGISTRY))}")
    if not isinstance(name, str):
        raise TypeError(f"get_norm: expected a norm name (str) or a registered class, got {type(name).__name__}")
    key = _NAME_INDEX.get(normalize_name(name))
    if key is None:
        choices = sorted(set(_NAME_INDEX) | set(_REGISTRY))
        close = difflib.get_close_matches(normalize_name(name), choices, n=3, cutoff=0.5)
        close_keys = sorted({_NAME_INDEX.get(c, c) for c in close})
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
