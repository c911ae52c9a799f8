"""Base class of normlab's norm modules: the shared constructor conventions, state and the norm protocol.

Conventions (house style): the first positional argument is the feature/channel count; every norm takes
``channel_dim`` (where the channel axis is); ``forward(x, mask=None)`` where ``mask`` is a padding mask
(``True`` = valid) that batch-statistic norms use and per-token norms may ignore, because a per-token statistic
never mixes tokens.

:class:`NormBase` owns what every norm shares, as ``torch.nn.modules.batchnorm._NormBase`` does for torch's:
the affine parameters (:meth:`NormBase._init_affine`), the running buffers and their reset values
(:meth:`NormBase._init_stats`), ``reset_parameters`` / ``reset_running_stats``, an ``extra_repr`` listing every
constructor argument that differs from its default, and a state-dict ``_version`` with a load hook
(:meth:`NormBase._upgrade_state_dict`).

**Implementations.** A norm whose class names a fused op in :attr:`NormBase.kernel_op` takes ``impl`` (``"auto"``,
``"composite"``, ``"cpu"``, ``"triton"``) and its forward is that :mod:`normlab.kernels.ops` function, which computes
the registered functional op's result with a fused kernel. Precedence: the module's own ``impl`` unless it is
``"auto"``, then the innermost :func:`normlab.kernels.use_impl` scope, then the kernel of the input's device when one is
available, else the composite functional op (details in :mod:`normlab.kernels._scope`).

The **norm protocol** is everything that differs between norms, asked of the norm itself so that no tool branches on
a registry name: :meth:`~NormBase.folded_affine` and :meth:`~NormBase.fold_note` (folding),
:meth:`~NormBase.recalibration_plan` (how to re-estimate the running statistics), :meth:`~NormBase.batch_stat_view`
(the statistics a batch-statistics monitor compares), :meth:`~NormBase.synced` (cross-rank statistics),
:attr:`~NormBase.saturates_inf` (whether ±inf inputs give finite outputs) and :meth:`~NormBase.torch_twin` (the
``torch.nn`` module whose state dict loads into the norm). ``normlab.walk`` gives foreign (``torch.nn``) norms the
same protocol through an adapter table.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from normlab.functional._checks import check_no_mask
from normlab.registry import Layout

__all__ = [
    "BatchNormProtocol",
    "BatchStatView",
    "FoldedAffine",
    "NormBase",
    "RecalibrationPlan",
    "batch_stat_affine",
    "bn_batch_stat_view",
    "bn_folded_affine",
    "bn_recalibration_plan",
    "check_layout",
    "check_int",
    "check_num_features",
    "check_unit",
    "quadratic_mean_affine",
]

_N = TypeVar("_N", bound="NormBase")


@dataclass
class FoldedAffine:
    """The eval-mode form of a foldable norm: ``y = scale * keep(x) + shift`` per channel.

    ``keep`` is a per-token module that must stay in the graph (PowerNorm's GroupScaling), or ``None``.
    ``scale`` and ``shift`` are 1-D float tensors of length ``num_features``, computed in float64 so a
    fold loses nothing before it casts back.
    """

    scale: Tensor
    shift: Tensor
    keep: nn.Module | None = None


@dataclass
class RecalibrationPlan:
    """How to make a norm's training forward write its pure batch statistic into its running buffers.

    :func:`normlab.surgery.recalibrate_stats` executes it: it sets the ``overrides`` for the pass, fills the
    ``counters`` before every call, blends what the forward wrote into ``stats`` and restores everything else.

    Attributes:
        stats: the running buffers the eval form reads, each with its reset value.
        overrides: ``(object, attribute, value)`` set for the pass and restored afterwards (e.g. ``momentum=1``,
            which makes the update ``running <- batch statistic``).
        counters: buffers set to ``value`` before every call and restored after the pass (step counters and
            schedules, so forwards that are not training steps do not advance them).
        keep: other buffers the training forward writes, restored after the pass.
        tracked: a ``num_batches_tracked`` buffer counting the pass's calls, or ``None``.
    """

    stats: list[tuple[Tensor, float]]
    overrides: list[tuple[Any, str, Any]] = field(default_factory=list)
    counters: list[tuple[Tensor, int]] = field(default_factory=list)
    keep: list[Tensor] = field(default_factory=list)
    tracked: Tensor | None = None


@dataclass
class BatchStatView:
    """What a batch-statistics monitor compares: a norm's running statistics and how to get their batch counterpart.

    Attributes:
        running_var: the statistic the eval form divides by: the unbiased variance when ``running_mean`` is given,
            else a quadratic mean (PowerNorm's ``running_phi``, UnifiedNorm's ``running_var``).
        running_mean: the running mean, or ``None`` for quadratic-mean norms.
        eps: the norm's eps.
        channel_dim: the channel axis of the norm's input.
        transform: applied to the input before its statistics are taken (PowerNorm's GroupScaling), or ``None``.
    """

    running_var: Tensor
    running_mean: Tensor | None
    eps: float
    channel_dim: int
    transform: Callable[[Tensor], Tensor] | None = None


def batch_stat_affine(
    running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Float64 ``(scale, shift)`` of BatchNorm's eval form: ``scale = γ/sqrt(rv + eps)``, ``shift = β - scale·rm``."""
    scale = (running_var.detach().double() + eps).rsqrt()
    if weight is not None:
        scale = scale * weight.detach().double()
    shift = -scale * running_mean.detach().double()
    if bias is not None:
        shift = shift + bias.detach().double()
    return scale, shift


# The BatchNorm family's protocol, written against torch's attribute names (running_mean, running_var, weight, bias,
# eps, momentum, num_batches_tracked), so normlab's BatchNorm and the torch.nn.BatchNorm*d adapter share one copy.
def bn_folded_affine(m: Any) -> FoldedAffine:
    """BatchNorm's eval affine ``scale = γ / sqrt(running_var + eps)``, ``shift = β - scale * running_mean``."""
    name = getattr(getattr(type(m), "norm_spec", None), "name", type(m).__name__)
    if m.training:
        raise RuntimeError(f"{name}: folded_affine() needs eval mode (running statistics); call .eval() first")
    if m.running_mean is None or m.running_var is None:
        raise TypeError(f"{name}: track_running_stats=False uses batch statistics in eval mode; not foldable")
    return FoldedAffine(*batch_stat_affine(m.running_mean, m.running_var, m.weight, m.bias, float(m.eps)))


class BatchNormProtocol:
    """Mixin (before :class:`NormBase` in the bases) giving a norm with BatchNorm's buffers and attribute names the
    BatchNorm family's protocol: fold, recalibration, the monitored statistics and cross-rank sync."""

    channel_dim: int
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    syncs_batch_stats: ClassVar[bool] = True

    def folded_affine(self) -> FoldedAffine:
        """``scale = γ / sqrt(running_var + eps)``, ``shift = β - scale * running_mean`` (float64)."""
        return bn_folded_affine(self)

    def recalibration_plan(self) -> RecalibrationPlan | None:
        return bn_recalibration_plan(self)

    def batch_stat_view(self) -> BatchStatView | None:
        return bn_batch_stat_view(self, self.channel_dim)


def quadratic_mean_affine(m: nn.Module, running: Tensor, keep: nn.Module | None = None) -> FoldedAffine:
    """Eval affine of a norm dividing by a running quadratic mean: ``scale = γ/sqrt(running + eps)``, ``shift = β``."""
    if m.training:
        name = getattr(getattr(type(m), "norm_spec", None), "name", type(m).__name__)
        raise RuntimeError(f"{name}: folded_affine() needs eval mode (running statistics); call .eval() first")
    scale = torch.rsqrt(running.detach().double() + getattr(m, "eps"))  # noqa: B009 - any norm module
    weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
    if weight is not None:
        scale = scale * weight.detach().double()
    shift = bias.detach().double() if bias is not None else torch.zeros_like(scale)
    return FoldedAffine(scale, shift, keep=keep)


def bn_recalibration_plan(m: Any) -> RecalibrationPlan | None:
    """Momentum 1 makes BatchNorm's update ``running <- batch statistic`` (torch semantics: unbiased variance)."""
    rm, rv = m.running_mean, m.running_var
    if not isinstance(rm, Tensor) or not isinstance(rv, Tensor):
        return None
    nbt = m.num_batches_tracked
    return RecalibrationPlan([(rm, 0.0), (rv, 1.0)], overrides=[(m, "momentum", 1.0)],
                             tracked=nbt if isinstance(nbt, Tensor) else None)


def bn_batch_stat_view(m: Any, channel_dim: int) -> BatchStatView | None:
    """BatchNorm's running mean and unbiased variance, or ``None`` without running statistics."""
    rm, rv = m.running_mean, m.running_var
    if not isinstance(rm, Tensor) or not isinstance(rv, Tensor):
        return None
    return BatchStatView(rv, rm, float(m.eps), channel_dim)


def check_layout(op: str, layout: Layout, channel_dim: int) -> int:
    """Validate ``channel_dim`` against a norm's layout trait."""
    if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
        raise TypeError(f"{op}: expected channel_dim to be an int, got {type(channel_dim).__name__}")
    if layout == "token" and channel_dim != -1:
        raise ValueError(
            f"{op}: this norm works on token tensors (*, C) only; expected channel_dim=-1, got {channel_dim}"
        )
    if layout == "channel_first" and channel_dim != 1:
        raise ValueError(f"{op}: this norm works on (N, C, *) tensors only; expected channel_dim=1, got {channel_dim}")
    return channel_dim


def check_num_features(op: str, num_features: Any, *, minimum: int = 1) -> int:
    """Validate a positive integer feature count."""
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < minimum:
        raise ValueError(f"{op}: expected num_features to be an int >= {minimum}, got {num_features!r}")
    return num_features


def check_int(op: str, name: str, value: Any, minimum: int = 0) -> int:
    """Validate an integer argument ``>= minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{op}: expected {name} to be an int >= {minimum}, got {value!r}")
    return value


def check_unit(op: str, name: str, value: Any, *, optional: bool = False) -> Any:
    """Validate a factor in ``[0, 1]`` (or ``None`` when ``optional``), such as a momentum."""
    if optional and value is None:
        return value
    if not 0.0 <= value <= 1.0:
        extra = " or None" if optional else ""
        raise ValueError(f"{op}: expected {name} in [0, 1]{extra}, got {value!r}")
    return value


_UNSET: Any = object()  # NormBase.__init__ without a feature count
_PLAIN = (bool, int, float, str, tuple, type(None))
_UNSHOWN = ("device", "dtype")


def _ctor_defaults(cls: type) -> dict[str, Any]:
    """Every keyword of ``cls``'s constructor chain with its default (a subclass's ``**kwargs`` reach its parent's)."""
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if klass is NormBase or not issubclass(klass, NormBase) or init is None:
            continue
        for p in list(inspect.signature(init).parameters.values())[1:]:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                defaults[p.name] = p.default
    return defaults


class NormBase(nn.Module):
    """Common base of normlab norms: shared state handling and the norm protocol (see the module docstring).

    Subclasses call ``super().__init__(num_features, channel_dim, layout)`` (which validates both and looks up the
    functional op), :meth:`_init_affine` and :meth:`_init_stats` in ``__init__``, implement
    :meth:`functional_kwargs` (the keyword arguments that make the functional op compute exactly this module's
    forward) and :meth:`forward`, and override the protocol methods whose default does not fit.
    """

    _version = 1
    #: ±inf inputs give finite outputs (DyT's tanh saturates); other norms propagate them as inf/NaN.
    saturates_inf: ClassVar[bool] = False
    #: ``process_group`` / ``sync_stats`` attributes choose cross-rank batch statistics (see :meth:`synced`).
    syncs_batch_stats: ClassVar[bool] = False
    #: constructor arguments :meth:`extra_repr` always shows (their value is resolved from a ``None`` default).
    repr_always: ClassVar[tuple[str, ...]] = ()
    #: constructor arguments :meth:`extra_repr` never shows (fixed by the class).
    repr_never: ClassVar[tuple[str, ...]] = ()
    #: the :mod:`normlab.kernels.ops` function with the functional op's signature and fused kernels (``None``: the
    #: functional op only); such a norm takes an ``impl`` constructor argument.
    kernel_op: ClassVar[str | None] = None
    #: the statistics pool over positions and the op takes no padding mask, so :meth:`forward` refuses a ``mask``
    #: (a per-token op ignores one: its statistic never mixes tokens).
    rejects_mask: ClassVar[bool] = False

    num_features: int
    channel_dim: int

    def __new__(cls: type[_N], *args: Any, **kwargs: Any) -> _N:
        # The constructor call as written, for extra_repr. copy/pickle call __new__ without arguments and then
        # restore __dict__, which holds the original call.
        self = super().__new__(cls)
        if args or kwargs:
            object.__setattr__(self, "_ctor_args", (args, dict(kwargs)))
        return self

    def __init__(
        self, num_features: Any = _UNSET, channel_dim: Any = -1, layout: Layout = "any", impl: str = "auto"
    ) -> None:
        """``nn.Module`` set-up; given ``num_features``, also :meth:`_setup` (a norm that validates its feature count
        itself, like a test-local one, passes nothing)."""
        super().__init__()
        if num_features is not _UNSET:
            self._setup(num_features, channel_dim, layout, impl)

    # ----- construction helpers -----
    def _setup(self, num_features: Any, channel_dim: Any, layout: Layout = "any", impl: str = "auto") -> None:
        """Validate and set ``num_features``, ``channel_dim`` and ``impl``; look up the registered functional op and
        the fused op once (at construction, so a compiled forward reads plain attributes)."""
        from normlab.kernels import _scope, ops

        name = self._name()
        self.num_features = check_num_features(name, num_features)
        self.channel_dim = check_layout(name, layout, channel_dim)
        self.impl = _scope.check_impl(impl, name)
        if impl != "auto" and self.kernel_op is None:
            raise ValueError(f"{name}: has no fused kernels; expected impl='auto', got impl={impl!r}")
        op = getattr(getattr(type(self), "norm_spec", None), "functional", None)
        params = list(inspect.signature(op).parameters)[1:] if op is not None else []
        self._op: Callable[..., Tensor] | None = op
        self._kernel: Callable[..., Tensor] | None = getattr(ops, self.kernel_op) if self.kernel_op else None
        self._op_params = tuple(p for p in params if p != "mask")
        self._op_takes_mask = "mask" in params

    def _name(self) -> str:
        """The registry name, for error messages."""
        spec = getattr(type(self), "norm_spec", None)
        return str(getattr(spec, "name", type(self).__name__))

    def _init_affine(
        self, shape: int | tuple[int, ...], *, weight: bool, bias: bool, device: Any = None, dtype: Any = None
    ) -> None:
        """Register ``weight`` and ``bias`` parameters of ``shape`` (``None`` where switched off); ``affine`` records
        whether there is a learnt ``weight``, as torch's norms do."""
        self.affine = weight
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        for name, on in (("weight", weight), ("bias", bias)):
            self.register_parameter(name, nn.Parameter(torch.empty(dims, device=device, dtype=dtype)) if on else None)

    def _init_stats(
        self,
        stats: Iterable[tuple[str, tuple[int, ...], float]],
        *,
        track: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        """Register state buffers ``(name, shape, reset value)``; ``num_batches_tracked``-like counters (a shape of
        ``()`` and an integer reset value) are ``long``. With ``track=False`` they are registered as ``None``."""
        resets: dict[str, float] = dict(getattr(self, "_stat_resets", {}))
        for name, shape, value in stats:
            counter = shape == () and isinstance(value, int)
            kind = torch.long if counter else dtype
            tensor = torch.full(shape, value, device=device, dtype=kind) if track else None
            self.register_buffer(name, tensor)
            resets[name] = value
        self._stat_resets = resets

    def _param_init(self) -> dict[str, float]:
        """The constant each parameter is reset to (a missing parameter is skipped)."""
        return {"weight": 1.0, "bias": 0.0}

    # ----- shared state -----
    def reset_running_stats(self) -> None:
        """Put every running buffer (and those of nested norms) back to its initial value."""
        for name, value in getattr(self, "_stat_resets", {}).items():
            buf = self._buffers.get(name)
            if buf is not None:
                buf.fill_(value)
        for child in self.children():
            if isinstance(child, NormBase):
                child.reset_running_stats()

    def reset_parameters(self) -> None:
        """Reset running statistics and parameters (and those of submodules that have ``reset_parameters``)."""
        self.reset_running_stats()
        for name, value in self._param_init().items():
            p = self._parameters.get(name)
            if p is not None:
                nn.init.constant_(p, value)
        for child in self.children():
            reset = getattr(child, "reset_parameters", None)
            if callable(reset):
                reset()

    def extra_repr(self) -> str:
        """The feature count, then every constructor argument that differs from its default."""
        args, kwargs = getattr(self, "_ctor_args", ((), {}))
        try:
            bound = inspect.signature(type(self)).bind(*args, **kwargs)
        except TypeError:  # pragma: no cover - the call succeeded, so it binds
            return str(self.num_features)
        values = dict(bound.arguments)
        for name, p in inspect.signature(type(self)).parameters.items():
            if p.kind is p.VAR_KEYWORD:
                values.update(values.pop(name, {}))
        first = next(iter(values.items()), (None, self.num_features))
        parts = [repr(first[1])]
        defaults = _ctor_defaults(type(self))
        for name, value in list(values.items())[1:]:
            if name in _UNSHOWN or name in self.repr_never or name not in defaults:
                continue  # also names a constructor swallows without using (IdentityNorm's **ignored)
            live = self.__dict__.get(name, value)
            shown = live if isinstance(live, _PLAIN) else value
            if name in self.repr_always or value != defaults[name]:
                parts.append(f"{name}={shown!r}")
        for name in self.repr_always:
            if name not in values and isinstance(self.__dict__.get(name), _PLAIN):
                parts.append(f"{name}={self.__dict__[name]!r}")
        if "impl" not in values and self.__dict__.get("impl", "auto") != "auto":  # set after construction
            parts.append(f"impl={self.__dict__['impl']!r}")
        return ", ".join(parts)

    def _upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int | None) -> None:
        """Rewrite, in place, a state dict saved by an older ``_version`` (``None``: saved without metadata)."""

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], *args: Any, **kwargs: Any
    ) -> None:
        self._upgrade_state_dict(state_dict, prefix, local_metadata.get("version"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    # ----- the norm protocol -----
    def functional_kwargs(self) -> dict[str, Any]:
        """The keyword arguments that make the registered functional op compute exactly this module's forward:
        every parameter of the op after the input (``mask`` aside) is :meth:`_functional_arg` of its name."""
        return {name: self._functional_arg(name) for name in self._op_params}

    def _functional_arg(self, name: str) -> Any:
        """One functional argument: the module's attribute of that name (``training``: its mode). Override for the
        ones a module keeps under another name or derives."""
        return self.training if name == "training" else getattr(self, name)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The registered functional op on ``x`` with :meth:`functional_kwargs` (through its fused version with
        ``impl=self.impl`` when the class has one); ``mask`` goes to ops that take one (batch statistics) and is
        ignored by per-token ops, whose statistic never mixes tokens; refused where :attr:`rejects_mask` says so."""
        if self._op is None:
            raise NotImplementedError(f"{type(self).__name__} registers no functional op; override forward()")
        if self.rejects_mask:
            check_no_mask(mask, self._name())
        kwargs = self.functional_kwargs()
        if self._op_takes_mask:
            kwargs["mask"] = mask
        kernel = getattr(self, "_kernel", None)  # None also for a module pickled before the kernels existed
        if kernel is not None:
            return kernel(x, **kwargs, impl=getattr(self, "impl", "auto"))
        return self._op(x, **kwargs)

    def folded_affine(self) -> FoldedAffine:
        """Eval-mode per-channel affine of a foldable norm (``NormSpec.foldable``); others raise ``TypeError``."""
        raise TypeError(
            f"{type(self).__name__} is not foldable: its eval-mode output is not a fixed per-channel affine"
        )

    def fold_note(self) -> str | None:
        """Why a fold of this norm deserves a second look (recorded in the fold report), or ``None``."""
        return None

    def recalibration_plan(self) -> RecalibrationPlan | None:
        """How :func:`~normlab.surgery.recalibrate_stats` re-estimates the running statistics; ``None`` when there are
        none (``track_running_stats=False``). Norms with the ``has_running_stats`` trait must override it."""
        raise NotImplementedError(f"{type(self).__name__} has running statistics but no recalibration rule")

    def batch_stat_view(self) -> BatchStatView | None:
        """The running statistics a batch-statistics monitor compares with the batch's, or ``None`` (no running
        statistics)."""
        return None

    def synced(self, process_group: Any = None) -> nn.Module:
        """Share batch statistics across the ranks of ``process_group`` (``None`` = WORLD): sets ``process_group``
        and ``sync_stats=True`` on this norm and the norms nested in it that sync; returns ``self``."""
        for m in self.modules():
            if isinstance(m, NormBase) and m.syncs_batch_stats:
                setattr(m, "process_group", process_group)  # noqa: B010 - declared by the norms that sync
                setattr(m, "sync_stats", True)  # noqa: B010
        return self

    @classmethod
    def resolved_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """The keyword arguments ``cls(num_features, **kwargs)`` runs with: its constructor's defaults (those of the
        parents a ``**kwargs`` reaches included) overridden by ``kwargs``; for :meth:`torch_twin`."""
        return {**_ctor_defaults(cls), **kwargs}

    @classmethod
    def torch_twin(cls, num_features: int, **kwargs: Any) -> nn.Module | None:
        """The ``torch.nn`` module equivalent to ``cls(num_features, **kwargs)`` whose state dict loads into it
        strictly, or ``None`` where torch has none."""
        return None
