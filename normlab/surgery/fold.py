"""Exact inference folding of BN-type norms into adjacent linear/conv layers: :func:`fold_norms` and its report.

In eval mode BatchNorm (https://arxiv.org/abs/1502.03167), RepBN / PRepBN (its eval form is RepBN at any λ; SLAB,
https://arxiv.org/abs/2405.11582), Unified Normalization (https://arxiv.org/abs/2208.01313), PowerNorm's per-channel
stage (https://arxiv.org/abs/2003.07845) and the identity are a fixed per-channel affine ``a ⊙ x + c``
(``NormBase.folded_affine()``). :func:`fold_norms` moves that affine into the linear layers that read the norm's
output (pre-norm: q, k, v, fc1, gate, up, the LM head) or into the linear/conv that writes its input (conv→BN,
Peri-LN branch-output norms), then replaces the norm by ``nn.Identity()`` (or by the per-token module that must stay,
PowerNorm's GroupScaling). The tensor math lives in :mod:`normlab.surgery.fold_math`; where a norm's layers are comes
from :mod:`normlab.surgery._fold_plan`. The eval affine is BatchNorm's inference form (Ioffe & Szegedy 2015, §3.1).

The fold is exact up to float rounding, or it is refused: train mode, a norm that is not foldable, a weight tied to
another module, a norm whose output is also the residual stream (Post-LN, DeepNorm), a conv with zero padding after a
norm. Everything is validated before anything is changed.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normlab.nn._base import FoldedAffine
from normlab.surgery._fold_plan import Direction, Plan, Refusal, plan_fx, plan_map, plan_structure
from normlab.surgery.fold_math import (
    _padding_is_zero,
    fold_affine_into_conv_input,
    fold_affine_into_conv_output,
    fold_affine_into_linear_input,
    fold_affine_into_linear_output,
)
from normlab.walk import is_norm, iter_norms, norm_protocol, spec_of

__all__ = ["FoldRecord", "FoldReport", "KeptAfterFold", "Refusal", "fold_norms", "norm_affine"]


@dataclass(frozen=True)
class FoldRecord:
    """One folded norm.

    Attributes:
        norm: the norm's module path.
        norm_type: its class name.
        direction: ``"into_consumers"`` (the layers reading its output) or ``"into_producer"`` (the layer writing its
            input).
        targets: module paths of the layers whose weights changed.
        replaced_by: class name of what now stands where the norm was (``Identity`` or the kept module).
        found_by: ``"structure"`` (normlab model), ``"fx"`` (traced graph) or ``"map"`` (the ``consumers`` argument).
        note: what the norm's ``fold_note()`` said about this fold (e.g. a PRepBN folded mid-ramp), else ``""``.
    """

    norm: str
    norm_type: str
    direction: Direction
    targets: tuple[str, ...]
    replaced_by: str
    found_by: str
    note: str = ""

    def __str__(self) -> str:
        arrow = "->" if self.direction == "into_consumers" else "<-"
        targets = ", ".join(self.targets)
        note = f"; note: {self.note}" if self.note else ""
        return f"{self.norm} ({self.norm_type}) {arrow} {targets}  [{self.found_by}; now {self.replaced_by}{note}]"


@dataclass
class FoldReport:
    """What :func:`fold_norms` did.

    Attributes:
        model: the folded model (the input itself when ``inplace=True``, else a folded deep copy).
        folded: one :class:`FoldRecord` per folded norm.
        refused: one :class:`Refusal` per norm left in place, with the reason (empty unless ``strict=False``).
        inplace: whether ``model`` is the module that was passed in.
    """

    model: nn.Module
    folded: list[FoldRecord] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    inplace: bool = False

    def __str__(self) -> str:
        lines = [f"fold_norms: folded {len(self.folded)} norm(s), refused {len(self.refused)}"]
        lines += [f"  folded  {r}" for r in self.folded]
        lines += [f"  refused {r}" for r in self.refused]
        return "\n".join(lines)


class KeptAfterFold(nn.Module):
    """The part of a folded norm that stays in the graph (PowerNorm's GroupScaling), accepting the norm's call form.

    The norm may have been called as ``norm(x, mask=...)``; the kept per-token module takes ``x`` only.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.module(x)


def norm_affine(norm: nn.Module) -> FoldedAffine:
    """The eval-mode per-channel affine of a norm module (its protocol's ``folded_affine()``), checked, or the error
    saying why it has none.

    Raises:
        TypeError: not a norm, or not foldable. RuntimeError: the norm's own refusal (train mode). ValueError: an
            affine of the wrong shape or with non-finite entries.
    """
    spec = spec_of(norm)
    if spec is not None and not spec.foldable:
        raise TypeError(
            f"{spec.name} is not foldable (registry trait foldable=False): its eval-mode output is not a fixed "
            "per-channel affine"
        )
    affine = norm_protocol(norm).folded_affine()
    if not isinstance(affine, FoldedAffine):
        raise TypeError(f"{type(norm).__name__}.folded_affine() returned {type(affine).__name__}, not a FoldedAffine")
    scale, shift = affine.scale, affine.shift
    if scale.dim() != 1 or shift.shape != scale.shape:
        raise ValueError(
            f"{type(norm).__name__}.folded_affine(): expected 1-D scale and shift of one size, got "
            f"{list(scale.shape)} and {list(shift.shape)}"
        )
    if not bool(torch.isfinite(scale).all() & torch.isfinite(shift).all()):
        raise ValueError(f"{type(norm).__name__}.folded_affine() has non-finite entries (running variance near 0?)")
    return affine


class _NotFoldable(TypeError):
    """A target layer of a kind a fold cannot rewrite (not ``nn.Linear`` / a ConvNd)."""


def _check_target(
    plan: Plan, target: str, layer: nn.Module | None, n: int, channel_dim: int, owners: Mapping[int, list[str]]
) -> str | None:
    """Why ``layer`` cannot take this fold exactly, or ``None``; raises :class:`_NotFoldable` for a layer kind that
    no fold rewrites."""
    if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
        kind = type(layer).__name__ if layer is not None else "missing"
        raise _NotFoldable(
            f"target {target} is {kind}, not nn.Linear or a ConvNd (parametrised/σReparam layers are not folded)"
        )
    if parametrize.is_parametrized(layer):
        return f"target {target} has a parametrization; its weight is computed, not stored"
    for name in ("weight", "bias"):
        p = getattr(layer, name)
        if p is not None and len(owners.get(id(p), ())) > 1:
            others = [o for o in owners[id(p)] if o != f"{target}.{name}"]
            return f"the {name} of {target} is shared/tied with {', '.join(others)}; folding would change them too"
        if p is not None and len(owners.get(id(p), ())) == 0:
            return f"the {name} of {target} is not a parameter of the model"
    need = n * plan.repeat
    if isinstance(layer, nn.Linear):
        if channel_dim not in (-1, 1):  # channel_dim=1 assumes (N, C) activations, as torch's fuse_linear_bn_eval
            return f"the norm normalizes axis {channel_dim}, but {target} (nn.Linear) reads the last axis"
        have = layer.in_features if plan.direction == "into_consumers" else layer.out_features
        side = "in_features" if plan.direction == "into_consumers" else "out_features"
        return None if have == need else f"{target} has {side}={have}, the norm has {need} channels"
    if channel_dim != 1:
        return f"the norm normalizes axis {channel_dim}, but {target} (a conv) has channels on axis 1"
    if plan.direction == "into_consumers":
        if layer.transposed:
            return f"{target} is a transposed conv after the norm: border outputs sum fewer taps, so b' is not exact"
        if layer.padding_mode == "zeros" and not _padding_is_zero(layer.padding, layer.kernel_size):
            return (
                f"{target} is a conv with zero padding ({layer.padding}) after the norm: the padded border taps "
                "would miss the norm's shift, so the fold is not exact"
            )
    have = layer.in_channels if plan.direction == "into_consumers" else layer.out_channels
    return None if have == need else f"{target} has {have} channels on the folded side, the norm has {need}"


def _validate(
    plan: Plan, norm: nn.Module, modules: Mapping[str, nn.Module], owners: Mapping[int, list[str]]
) -> FoldedAffine | Refusal:
    name = type(norm).__name__
    try:
        affine = norm_affine(norm)
    except (TypeError, RuntimeError, ValueError) as exc:
        return Refusal(plan.norm, name, str(exc), type(exc))
    if affine.keep is not None and plan.direction == "into_producer":
        return Refusal(
            plan.norm,
            name,
            f"it keeps {type(affine.keep).__name__} (a per-token op) between the layer before it and its affine, "
            "so it folds only into layers that read its output, and here its output goes elsewhere (e.g. a residual "
            "add)",
        )
    n = affine.scale.numel()
    cdim = norm_protocol(norm).channel_dim
    for target in plan.targets:
        try:
            why = _check_target(plan, target, modules.get(target), n, cdim, owners)
        except _NotFoldable as exc:
            return Refusal(plan.norm, name, str(exc), TypeError)
        if why is not None:
            return Refusal(plan.norm, name, why, ValueError)
    return affine


def _write(layer: nn.Linear | nn.modules.conv._ConvNd, weight: Tensor, bias: Tensor) -> None:
    w = layer.weight
    with torch.no_grad():
        w.copy_(weight)
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(w.device), requires_grad=w.requires_grad)
        else:
            layer.bias.copy_(bias)


def _apply(model: nn.Module, plan: Plan, affine: FoldedAffine) -> str:
    a, c = affine.scale.double(), affine.shift.double()
    for target in plan.targets:
        layer = model.get_submodule(target)
        if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):  # validated before; keeps mypy precise
            raise TypeError(f"fold_norms: {target} is {type(layer).__name__}, not nn.Linear or a ConvNd")
        w, b = layer.weight, layer.bias
        if plan.direction == "into_consumers":
            cs = c * plan.shift_factor
            if isinstance(layer, nn.Linear):
                new = fold_affine_into_linear_input(w, b, a, cs)
            else:
                new = fold_affine_into_conv_input(
                    w, b, a, cs, groups=layer.groups, padding=layer.padding, padding_mode=layer.padding_mode
                )
        else:
            ar, cr = a.repeat(plan.repeat), c.repeat(plan.repeat)
            if isinstance(layer, nn.Linear):
                new = fold_affine_into_linear_output(w, b, ar, cr)
            else:
                new = fold_affine_into_conv_output(w, b, ar, cr, transposed=layer.transposed, groups=layer.groups)
        _write(layer, *new)
    keep = affine.keep
    if keep is None:
        replacement: nn.Module = nn.Identity()
    else:
        params = inspect.signature(keep.forward).parameters.values()
        takes_mask = any(p.name == "mask" or p.kind is p.VAR_KEYWORD for p in params)
        # normlab models pass a mask only to registered batch-statistic norms, so the bare module works there.
        replacement = keep if takes_mask or plan.found_by == "structure" else KeptAfterFold(keep)
    parent_path, _, attr = plan.norm.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, replacement)
    return type(replacement).__name__


def _is_normlab_model(model: nn.Module) -> bool:
    from normlab.models import DecoderLM, ViTEncoder

    return isinstance(model, (DecoderLM, ViTEncoder))


def fold_norms(
    model: nn.Module,
    consumers: Mapping[str, Sequence[str] | str] | None = None,
    *,
    inplace: bool = False,
    strict: bool = True,
) -> FoldReport:
    """Fold every foldable norm of an eval-mode model into its adjacent linear layers; return a :class:`FoldReport`.

    Where each norm goes: for normlab's :class:`~normlab.models.DecoderLM` / :class:`~normlab.models.ViTEncoder` the
    known structure (input norms into q/k/v and fc1 or gate/up, branch-output norms into out_proj/fc2, QK-norms into
    q_proj/k_proj, the final norm into the head); for other modules ``torch.fx`` tracing (into the single linear/conv
    whose output only the norm reads, else into its users if all are linear/conv layers reading only it); or
    ``consumers``, an explicit ``{norm_path: [linear paths]}`` map, which replaces discovery (only the named norms
    are folded, and the listed layers must be all that read each norm's output).

    Everything is checked before anything changes: in strict mode one refusal raises and leaves ``model`` untouched;
    with ``strict=False`` the refused norms stay and are listed in ``report.refused``. A norm normalising axis 1
    (``channel_dim=1``, torch ``BatchNorm1d``) next to an ``nn.Linear`` is taken to see 2-D ``(N, C)`` activations,
    the same assumption ``torch.nn.utils.fuse_linear_bn_eval`` makes; a conv neighbour needs ``channel_dim=1``.

    Args:
        model: a module in eval mode.
        consumers: optional explicit map, see above.
        inplace: fold ``model`` itself. Default ``False``: fold a deep copy, returned as ``report.model`` (a fold is
            lossy by design: the norm's statistics are gone afterwards).
        strict: raise on any norm that cannot be folded exactly (default); else fold the rest and report.

    Returns:
        The report; ``report.model`` is the folded model.

    Raises:
        RuntimeError: the model or a norm is in train mode. TypeError / ValueError / RuntimeError (strict): the first
            refused norm's error type, with every refusal listed. TypeError: an untraceable model without
            ``consumers``, or a malformed ``consumers``. ValueError: ``consumers`` names a missing or non-norm module.

    Example:
        >>> from normlab.nn import BatchNorm
        >>> net = nn.Sequential(nn.Linear(4, 8), BatchNorm(8, channel_dim=-1), nn.ReLU()).eval()
        >>> report = fold_norms(net)
        >>> report.folded[0].targets, report.folded[0].direction, type(report.model[1]).__name__
        (('0',), 'into_producer', 'Identity')
    """
    norms = _eval_norms(model)
    items = _plan(model, norms, consumers)
    accepted, refused = _accept(model, norms, items)
    if strict and refused:
        listing = "\n".join(f"  - {r}" for r in refused)
        raise refused[0].error(
            f"fold_norms: refused to fold {len(refused)} norm(s); the model was not changed "
            f"(pass strict=False to fold the others and list these in FoldReport.refused):\n{listing}"
        )
    target = model if inplace else copy.deepcopy(model)
    folded = _execute(target, norms, accepted, inplace=inplace)
    return FoldReport(model=target, folded=folded, refused=refused, inplace=inplace)


def _eval_norms(model: nn.Module) -> dict[str, nn.Module]:
    """The norms of ``model`` by path, after checking it is a model (not a norm) in eval mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_norms: expected an nn.Module, got {type(model).__name__}")
    if is_norm(model):
        raise TypeError(f"fold_norms: expected a model containing norms, got the norm {type(model).__name__} itself")
    norms = {path: m for path, m, _ in iter_norms(model)}
    training = [p for p, m in norms.items() if m.training]
    if model.training or training:
        where = f"norms in train mode: {', '.join(training[:5])}" if training else "model.training=True"
        raise RuntimeError(
            f"fold_norms: needs eval mode (train-mode norms use batch statistics, not a fixed affine); got {where}; "
            "call model.eval() first"
        )
    return norms


def _plan(
    model: nn.Module, norms: Mapping[str, nn.Module], consumers: Mapping[str, Sequence[str] | str] | None
) -> list[Plan | Refusal]:
    """Where each norm would go: the explicit ``consumers`` map, a normlab model's structure, or an fx trace."""
    if consumers is not None:
        return plan_map(model, norms, consumers)
    if _is_normlab_model(model):
        return plan_structure(model, norms)
    return plan_fx(model, norms)


def _accept(
    model: nn.Module, norms: Mapping[str, nn.Module], items: Sequence[Plan | Refusal]
) -> tuple[list[tuple[Plan, FoldedAffine]], list[Refusal]]:
    """Validate every plan against the unchanged model: the plans that fold exactly, each with its norm's affine, and
    the refusals (the planner's, the validator's, and a second fold into a layer already claimed in one direction)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    owners: dict[int, list[str]] = {}  # every path of every parameter: a layer at two paths or a tied weight
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    accepted: list[tuple[Plan, FoldedAffine]] = []
    refused: list[Refusal] = []
    claimed: dict[tuple[str, Direction], str] = {}
    for item in items:
        if isinstance(item, Refusal):
            refused.append(item)
            continue
        result = _validate(item, norms[item.norm], modules, owners)
        if isinstance(result, Refusal):
            refused.append(result)
            continue
        clash = [claimed[(t, item.direction)] for t in item.targets if (t, item.direction) in claimed]
        if clash:
            refused.append(
                Refusal(
                    item.norm,
                    type(norms[item.norm]).__name__,
                    f"a target layer is already folded with {clash[0]} in the same direction, so it reads two "
                    "different inputs; neither fold would be exact",
                )
            )
            continue
        claimed.update({(t, item.direction): item.norm for t in item.targets})
        accepted.append((item, result))
    return accepted, refused


def _execute(
    target: nn.Module,
    norms: Mapping[str, nn.Module],
    accepted: Sequence[tuple[Plan, FoldedAffine]],
    *,
    inplace: bool,
) -> list[FoldRecord]:
    """Apply the accepted folds to ``target`` (the model, or its copy when not ``inplace``); one record per fold."""
    folded: list[FoldRecord] = []
    for plan, affine in accepted:
        if not inplace:  # the copy's own norm: its keep module must be the copy's, not the original's
            affine = norm_affine(target.get_submodule(plan.norm))
        kept = _apply(target, plan, affine)
        norm = norms[plan.norm]
        note = norm_protocol(norm).fold_note() or ""
        record = FoldRecord(plan.norm, type(norm).__name__, plan.direction, plan.targets, kept, plan.found_by, note)
        folded.append(record)
    return folded
