"""Norm swapping: :func:`swap_norms` replaces selected norms of any model (normlab's, ``torch.nn``'s, Hugging Face's)
with a registry norm, carries over what carries over and can be undone.

The source of every swap is read through its normlab form (:func:`normlab.walk.normlab_form`): its eps, channel
axis, affine parameters and running statistics. The target is built with the source's eps, never its own default,
so a swap that keeps the math (``nn.LayerNorm`` → ``layer_norm``, ``LlamaRMSNorm`` → ``rms_norm``) changes no output
bit. Where the target's method defines a data-driven start, ``init="match"`` gives it one:

* DyT (Zhu et al. 2025, https://arxiv.org/abs/2503.10622): the paper's analysis (§6.1) finds that the learned α
  tracks ``1/std`` of the layer's input activations; with ``batches`` α starts at ``1/std`` of the input the
  replaced norm received on them, without ``batches`` at DyT's α0 (0.5, the official conversion's constant).
* norms with running statistics (BatchNorm family): statistics not carried over from a norm of the same kind are
  estimated by :func:`normlab.surgery.recalibrate_stats` over ``batches`` (only the swapped norms' statistics move).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normlab.nn._base import _ctor_defaults
from normlab.registry import NormSpec, get_norm
from normlab.surgery.recalibrate import _default_forward, recalibrate_stats
from normlab.walk import NormlabForm, iter_norms, norm_protocol, normlab_form

__all__ = ["SwapRecord", "SwapReport", "swap_norms"]

_INITS = ("match", "carry", "default")
_STATS = ("running_mean", "running_var", "num_batches_tracked")
# Constructor arguments that mean the same in every norm that takes them (eps: added to the statistic).
_SHARED = ("eps", "eps_placement", "channel_dim")
# Arguments carried only between norms of the same registry name (momentum conventions, group counts differ).
_SAME_KIND = ("momentum", "track_running_stats", "num_groups", "p", "k_rounding", "alpha_init")


@dataclass
class SwapRecord:
    """One swapped norm.

    Attributes:
        path: its module path.
        source: the replaced module's class name.
        target: the registry name of the new norm.
        kwargs: the new norm's constructor arguments (after the feature count).
        carried: the new norm's tensors copied from the source (γ = ``weight``, β = ``bias``, running statistics).
        fresh: the new norm's tensors that start at their own initial value (or the data-driven one of ``init``).
        init: what the data-driven start did, or ``""``.
        keys_added: state-dict keys (relative to ``path``) the new norm has and the old one had not.
        keys_removed: state-dict keys the old norm had and the new one has not.
        max_abs_delta: with ``batches``: max |new(x) − old(x)| over the inputs this norm received, else ``None``.
    """

    path: str
    source: str
    target: str
    kwargs: dict[str, Any]
    carried: list[str]
    fresh: list[str]
    init: str = ""
    keys_added: list[str] = field(default_factory=list)
    keys_removed: list[str] = field(default_factory=list)
    max_abs_delta: float | None = None


@dataclass
class SwapReport:
    """What :func:`swap_norms` did; :meth:`undo` puts the original modules back.

    Attributes:
        model: the model (changed in place).
        swaps: one :class:`SwapRecord` per swapped norm, in ``named_modules()`` order.
        max_abs_delta_output: with ``batches``: max |Δ| of the model's output (its first tensor) over them.
        num_batches: batches the checks and data-driven starts ran on.
    """

    model: nn.Module
    swaps: list[SwapRecord]
    max_abs_delta_output: float | None = None
    num_batches: int = 0
    _places: list[tuple[nn.Module, str, nn.Module, nn.Module]] = field(default_factory=list, repr=False)
    _undone: bool = field(default=False, repr=False)

    def undo(self) -> nn.Module:
        """Put every replaced module back where it was (the originals, untouched); returns the model.

        Raises:
            RuntimeError: called twice.
        """
        if self._undone:
            raise RuntimeError("SwapReport.undo: this swap was undone already")
        for parent, attr, old, _ in self._places:
            setattr(parent, attr, old)
        self._undone = True
        return self.model

    def __str__(self) -> str:
        head = f"swap_norms: {len(self.swaps)} norm(s)"
        if self.max_abs_delta_output is not None:
            head += f"; max |Δoutput| = {self.max_abs_delta_output:.3g} over {self.num_batches} batch(es)"
        lines = [head]
        for r in self.swaps:
            delta = "" if r.max_abs_delta is None else f", max |Δ| = {r.max_abs_delta:.3g}"
            init = f", {r.init}" if r.init else ""
            lines.append(f"  {r.path}: {r.source} -> {r.target}, carried {r.carried or 'nothing'}{init}{delta}")
        return "\n".join(lines)


def _target(to: Any) -> tuple[NormSpec, dict[str, Any]]:
    """The target spec and the user's constructor overrides (from a ``functools.partial``)."""
    overrides: dict[str, Any] = {}
    if isinstance(to, functools.partial):
        if to.args:
            raise TypeError("swap_norms: a partial for `to` takes keyword arguments only (the width comes from the "
                            f"replaced norm), got positional {to.args!r}")
        overrides, to = dict(to.keywords), to.func
    if not isinstance(to, (str, type)):
        raise TypeError(f"swap_norms: expected `to` to be a registry name, a registered class or a partial of one, "
                        f"got {type(to).__name__}")
    try:
        return get_norm(to), overrides
    except KeyError as err:
        raise ValueError(f"swap_norms: unknown target norm for `to`: {err.args[0]}") from None


def _selector(where: Any) -> Callable[[str, nn.Module, NormSpec], bool]:
    if where is None:
        return lambda name, m, spec: True
    if isinstance(where, str):
        pattern = re.compile(where)
        return lambda name, m, spec: pattern.search(name) is not None
    if isinstance(where, type) or (isinstance(where, tuple) and all(isinstance(c, type) for c in where)):
        return lambda name, m, spec: isinstance(m, where)
    if isinstance(where, Mapping):
        traits = dict(where)
        return lambda name, m, spec: all(spec.traits()[k] == v for k, v in traits.items())
    if callable(where):
        return lambda name, m, spec: bool(where(name, m, spec))
    raise TypeError("swap_norms: expected `where` to be None, a module-name regex (str), a class or tuple of classes, "
                    f"a mapping of traits or a callable (name, module, spec) -> bool, got {type(where).__name__}")


def _select(model: nn.Module, where: Any) -> list[tuple[str, nn.Module]]:
    if isinstance(where, Mapping):
        list(iter_norms(model, **where))  # unknown trait names raise KeyError here
    keep = _selector(where)
    found = list(iter_norms(model))
    chosen = [(name, m) for name, m, spec in found if keep(name, m, spec)]
    if not chosen:
        names = ", ".join(f"{n} ({type(m).__name__})" for n, m, _ in found[:12]) or "none"
        raise ValueError(f"swap_norms: where={where!r} selected no norm; the model's norms: {names}")
    if chosen[0][0] == "":
        raise ValueError("swap_norms: the model itself is a norm; wrap it in a module to swap it")
    return chosen


def _kwargs(spec: NormSpec, form: NormlabForm, overrides: dict[str, Any], channel_dim: int) -> dict[str, Any]:
    """The target's constructor arguments: the source's eps, axis and affine structure where the target takes them."""
    accepted = _ctor_defaults(spec.cls)
    src = {**form.kwargs, "channel_dim": channel_dim}
    kw = {k: src[k] for k in _SHARED if k in accepted and k in src}
    if spec.name == form.name:
        kw.update({k: src[k] for k in _SAME_KIND if k in accepted and k in src})
    has_w, has_b = "weight" in form.tensors, "bias" in form.tensors
    if "affine" in accepted:
        kw["affine"] = has_w or has_b
    if "bias" in accepted:
        kw["bias"] = has_b
    if "unit_offset" in accepted and src.get("unit_offset"):
        kw["unit_offset"] = True
    if channel_dim != -1 and "channel_dim" not in accepted:
        raise ValueError(f"swap_norms: {spec.name} has no channel_dim argument, and the replaced norm normalises "
                         f"axis {channel_dim}")
    kw.update(overrides)
    return kw


def _factory(form: NormlabForm, model: nn.Module) -> dict[str, Any]:
    like = next((t for t in form.tensors.values() if t.is_floating_point()), None)
    if like is None:
        like = next((p for p in model.parameters() if p.is_floating_point()), None)
    return {} if like is None else {"device": like.device, "dtype": like.dtype}


def _carry(new: nn.Module, form: NormlabForm, same_kind: bool) -> tuple[list[str], list[str]]:
    """Copy γ, β (and, between norms of one kind, running statistics) into ``new``; the names carried and fresh."""
    carried: list[str] = []
    src_offset = bool(form.kwargs.get("unit_offset", False))
    dst_offset = bool(getattr(new, "unit_offset", False))
    with torch.no_grad():
        for name, src in form.tensors.items():
            dst = getattr(new, name, None)
            if not isinstance(dst, Tensor) or dst.shape != src.shape or (name in _STATS and not same_kind):
                continue
            value = src.detach()
            if name == "weight" and src_offset != dst_offset:  # gain 1 + w on one side only
                value = value.float() + (1.0 if src_offset else -1.0)
            if isinstance(dst, nn.Parameter):
                new._parameters[name] = nn.Parameter(value.to(dst.dtype).clone(), requires_grad=src.requires_grad)
            else:
                dst.copy_(value)
            carried.append(name)
    tensors = [n for n, t in [*new.named_parameters(recurse=False), *new.named_buffers(recurse=False)]]
    return carried, [n for n in tensors if n not in carried]


def _places(model: nn.Module, module: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (parent, attribute) holding ``module`` (a module shared by several parents is swapped everywhere)."""
    out = []
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is module:
                out.append((parent, attr))
    return out


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, Tensor):
            return v
    raise TypeError(f"swap_norms: the model's output ({type(out).__name__}) holds no tensor to compare")


class _Eval:
    """The model in eval mode under ``no_grad`` for the checks; every module's flag restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags = [(m, m.training) for m in model.modules()]

    def __enter__(self) -> None:
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        torch.set_grad_enabled(self.grad)
        for m, flag in self.flags:
            m.training = flag


def _first_pass(model: nn.Module, batches: list[Any], forward: Callable[[nn.Module, Any], Any],
                watch: dict[str, nn.Module]) -> tuple[list[Tensor], dict[str, list[float]]]:
    """The original model's outputs, and per watched norm the input moments ``[sum x, sum x², count]``."""
    moments: dict[str, list[float]] = {p: [0.0, 0.0, 0.0] for p in watch}

    def hook(path: str) -> Callable[..., None]:
        def record(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().double()
            acc = moments[path]
            acc[0] += float(x.sum())
            acc[1] += float(x.square().sum())
            acc[2] += x.numel()
        return record

    handles = [m.register_forward_pre_hook(hook(p)) for p, m in watch.items()]
    try:
        with _Eval(model):
            outs = [_first_tensor(forward(model, b)).detach().clone() for b in batches]
    finally:
        for h in handles:
            h.remove()
    return outs, moments


def _check_pass(report: SwapReport, batches: list[Any], forward: Callable[[nn.Module, Any], Any],
                before: list[Tensor]) -> None:
    """Per swapped norm max |new(x) − old(x)| on the inputs it receives, and the model's max |Δoutput|."""
    deltas = {r.path: 0.0 for r in report.swaps}

    def hook(path: str, old: nn.Module) -> Callable[..., None]:
        def compare(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            ref = old(*args, **kwargs)
            d = (out.double() - ref.double()).abs().max() if out.numel() else torch.zeros(())
            deltas[path] = max(deltas[path], float(d))
        return compare

    olds = {id(new): old for _, _, old, new in report._places}
    handles = [report.model.get_submodule(r.path).register_forward_hook(
        hook(r.path, olds[id(report.model.get_submodule(r.path))]), with_kwargs=True) for r in report.swaps]
    worst = 0.0
    try:
        flags = [(old, old.training) for _, _, old, _ in report._places]
        for old, _ in flags:
            old.eval()
        with _Eval(report.model):
            for batch, ref in zip(batches, before, strict=True):
                out = _first_tensor(forward(report.model, batch))
                worst = max(worst, float((out.double() - ref.double()).abs().max()) if out.numel() else 0.0)
        for old, flag in flags:
            old.training = flag
    finally:
        for h in handles:
            h.remove()
    for r in report.swaps:
        r.max_abs_delta = deltas[r.path]
    report.max_abs_delta_output = worst


def _match_dyt(report: SwapReport, moments: dict[str, list[float]] | None) -> None:
    for r in report.swaps:
        alpha: Tensor = report.model.get_submodule(r.path).get_parameter("alpha")
        if moments is None or moments[r.path][2] == 0:
            why = "no batches" if moments is None else "not called on the batches"
            r.init = f"alpha = {float(alpha.detach()):.4g} (DyT's alpha0; {why}, so no 1/std(input))"
            continue
        s, sq, n = moments[r.path]
        std = math.sqrt(max(sq / n - (s / n) ** 2, 0.0))
        if std == 0.0:
            r.init = f"alpha = {float(alpha.detach()):.4g} (DyT's alpha0: the input has std 0)"
            continue
        with torch.no_grad():
            alpha.fill_(1.0 / std)
        r.init = f"alpha = 1/std(input) = {1.0 / std:.4g}"
        if "alpha" in r.fresh:
            r.fresh.remove("alpha")


def _recalibrate(report: SwapReport, batches: list[Any], forward: Callable[[nn.Module, Any], Any]) -> None:
    """Recalibrate the running statistics of the swapped norms that did not carry any; every other norm's restored."""
    todo = {r.path for r in report.swaps if "running_var" in r.fresh or "running_mean" in r.fresh}
    if not todo:
        return
    mine = {id(report.model.get_submodule(p)) for p in todo}
    others = [m for _, m, _ in iter_norms(report.model, has_running_stats=True) if id(m) not in mine]
    saved = {id(m): [(b, b.clone()) for b in m.buffers()] for m in others}

    def keep(m: nn.Module, _args: Any) -> None:
        # The pass resets and trains every norm with statistics; the others run in eval mode on their own.
        m.training = False
        with torch.no_grad():
            for buf, value in saved[id(m)]:
                buf.copy_(value)

    handles = [m.register_forward_pre_hook(keep, prepend=True) for m in others]
    try:
        done = recalibrate_stats(report.model, batches, forward=forward)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for buf, value in (pair for pairs in saved.values() for pair in pairs):
                buf.copy_(value)
    for r in report.swaps:
        if r.path in todo:
            calls = done.calls.get(r.path, 0)
            r.init = f"running statistics recalibrated on {calls} batch statistic(s)" if calls else \
                "running statistics left at their reset values: not called on the batches"
            r.fresh = [n for n in r.fresh if n not in _STATS] if calls else r.fresh


def _build(path: str, m: nn.Module, spec: NormSpec, overrides: dict[str, Any], model: nn.Module,
           init: str) -> tuple[nn.Module, SwapRecord]:
    try:
        form = normlab_form(m)
    except TypeError as err:
        raise TypeError(f"swap_norms: cannot read the norm at {path}: {err}") from None
    kwargs = _kwargs(spec, form, overrides, norm_protocol(m).channel_dim)
    try:
        new = spec.cls(form.num_features, **kwargs, **_factory(form, model))
    except (TypeError, ValueError) as err:
        raise type(err)(f"swap_norms: cannot build {spec.name} for {path} ({type(m).__name__}): {err}") from None
    if init == "default":
        carried: list[str] = []
        fresh = [n for n, _ in [*new.named_parameters(recurse=False), *new.named_buffers(recurse=False)]]
    else:
        carried, fresh = _carry(new, form, same_kind=spec.name == form.name)
    new.train(m.training)
    old_keys, new_keys = set(m.state_dict()), set(new.state_dict())
    record = SwapRecord(path, type(m).__name__, spec.name, kwargs, carried, fresh,
                        keys_added=sorted(new_keys - old_keys), keys_removed=sorted(old_keys - new_keys))
    return new, record


def _check_args(model: Any, init: Any, forward: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_norms: expected model to be an nn.Module, got {type(model).__name__}")
    if init not in _INITS:
        raise ValueError(f"swap_norms: expected init in {_INITS}, got {init!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"swap_norms: expected forward to be callable (model, batch) -> output, got "
                        f"{type(forward).__name__}")


def swap_norms(
    model: nn.Module,
    to: Any,
    *,
    where: Any = None,
    init: str = "match",
    batches: Iterable[Any] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> SwapReport:
    """Replace the selected norms of ``model`` (in place) by the registry norm ``to``.

    Every norm :func:`normlab.iter_norms` sees can be replaced: normlab's, ``torch.nn``'s and the Hugging Face
    classes of :mod:`normlab.walk_hf`. The new norm is built with the replaced one's width, eps (never the target's
    default), channel axis and affine structure where the target takes them (``bias=True`` for a LayerNorm β going
    into RMSNorm, ``affine=False`` for a LayerNorm without parameters), on its device and dtype, in its train/eval
    mode, at every place the replaced module is held. Carried over: γ (``weight``; Gemma's ``1 + w`` gain is
    converted when only one side stores an offset), β (``bias``) and, between norms of the same registry kind,
    running statistics. State-dict keys stay as they were wherever the target has tensors of those names; the
    record lists the keys added and removed.

    Args:
        model: any module; changed in place (:meth:`SwapReport.undo` reverts).
        to: a registry name (``"rms_norm"``), a registered class, or ``functools.partial(cls, **kwargs)`` of one,
            whose keywords override the derived constructor arguments (``partial(DyT, alpha_init=0.2)``).
        where: which norms: ``None`` (all), a module-name regex (``re.search``), a class or tuple of classes
            (``isinstance``), a mapping of traits (``{"layout": "token"}``) or ``f(name, module, spec) -> bool``.
        init: ``"match"`` (default): carry γ, β and statistics, then the method's data-driven start (module
            docstring); ``"carry"``: carry only; ``"default"``: carry nothing (the target's own initialisation,
            still with the source's eps and structure).
        batches: model inputs (a Tensor, a tuple of positional or a mapping of keyword arguments each, or anything
            ``forward`` takes) for the data-driven starts and the check: the report then gives every swapped norm's
            max |Δ| on the inputs it receives and the model's max |Δoutput| (its first output tensor), eval mode.
        forward: ``forward(model, batch)``; default as :func:`normlab.surgery.recalibrate_stats`.

    Returns:
        A :class:`SwapReport`.

    Raises:
        TypeError: ``model`` not a module, a bad ``to`` / ``where`` / ``forward`` type, a selected norm with no normlab
            form. ValueError: an unknown target norm, an unknown ``init``, a ``where`` that selects nothing, a
            target that cannot take the norm's axis, ``init="match"`` for a norm with running statistics and no
            ``batches``, empty ``batches``. KeyError: an unknown trait in ``where``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8, eps=1e-6))
        >>> report = swap_norms(net, "rms_norm")
        >>> net[1], report.swaps[0].carried
        (RMSNorm(8, eps=1e-06, bias=True), ['weight', 'bias'])
        >>> _ = report.undo(); net[1]
        LayerNorm((8,), eps=1e-06, elementwise_affine=True, bias=True)
    """
    _check_args(model, init, forward)
    spec, overrides = _target(to)
    chosen = _select(model, where)
    data = None if batches is None else list(batches)
    if data is not None and not data:
        raise ValueError("swap_norms: batches is empty; pass None to skip the data-driven start and the check")
    built = [_build(path, m, spec, overrides, model, init) for path, m in chosen]
    needs_data = [r.path for _, r in built if "running_var" in r.fresh or "running_mean" in r.fresh]
    if init == "match" and needs_data and data is None:
        raise ValueError(f"swap_norms: {spec.name} has running statistics that init='match' estimates from batches; "
                         f"pass batches, or init='carry' to keep them at their reset values ({needs_data[0]}, ...)")
    fwd = forward or _default_forward
    before, moments = _first_pass(model, data, fwd, dict(chosen)) if data is not None else ([], None)
    report = SwapReport(model, [r for _, r in built], num_batches=len(data or []))
    for (_, old), (new, _) in zip(chosen, built, strict=True):
        for parent, attr in _places(model, old):
            setattr(parent, attr, new)
            report._places.append((parent, attr, old, new))
    if init == "match" and spec.name == "dyt":
        _match_dyt(report, moments)
    if init == "match" and data is not None:
        _recalibrate(report, data, fwd)
    if data is not None:
        _check_pass(report, data, fwd, before)
    return report
