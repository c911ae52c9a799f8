"""Adaptive Gradient Clipping (AGC) of Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition
Without Normalization" (ICML 2021), https://arxiv.org/abs/2102.06171, §4.1.

Unit-wise: for every output unit ``i`` of a parameter ``W`` with gradient ``G``,
``G_i ← G_i · λ·max(‖W_i‖, ε) / ‖G_i‖`` when ``‖G_i‖ > λ·max(‖W_i‖, ε)`` (Frobenius norms). The paper clips every
layer except the final classifier (§4.1, "we find it is always better not to clip the final linear layer").

Unit axes in PyTorch layout, as DeepMind's code for its own (HWIO) layout: a ``(O, *)`` weight of ``nn.Linear`` or
``nn.ConvNd`` has one unit per ``W[o]``; a ``ConvTransposeNd`` weight ``(I, O, *k)`` one per ``W[:, o]``; vectors
and scalars (biases, gains, Fixup/SkipInit scalars) are one unit each.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["AGCParam", "agc_parameters", "attach_agc", "clip_grad_agc_", "find_classifier", "unitwise_norm"]

AGCParam = Union[Tensor, tuple[Tensor, Union[int, None]]]
"""A parameter, or ``(parameter, unit_dim)``: ``unit_dim`` = its output axis, ``None`` = the whole tensor is one
unit. A bare tensor uses dim 0 when it has 2+ dims and the whole tensor otherwise."""

CLASSIFIER_NAMES = ("head", "fc", "classifier", "lm_head")


def unitwise_norm(x: Tensor, unit_dim: int | None) -> Tensor:
    """Frobenius norm of every slice ``x.select(unit_dim, i)`` (kept broadcastable to ``x``), or of the whole tensor
    for ``unit_dim=None``; computed in float32 at least."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if unit_dim is None or x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    dims = tuple(d for d in range(x.dim()) if d != unit_dim % x.dim())
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True)


def _resolve(item: object, index: int) -> tuple[Tensor, int | None]:
    if isinstance(item, Tensor):
        return item, (0 if item.dim() >= 2 else None)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Tensor):
        p, unit_dim = item
        if unit_dim is None:
            return p, None
        if isinstance(unit_dim, bool) or not isinstance(unit_dim, int):
            raise TypeError(f"clip_grad_agc_: parameters[{index}]: expected unit_dim int or None, got {unit_dim!r}")
        if not -p.dim() <= unit_dim < p.dim():
            raise ValueError(
                f"clip_grad_agc_: parameters[{index}] of shape {list(p.shape)} has no output axis {unit_dim}; "
                f"use unit_dim=None to treat the whole tensor as one unit"
            )
        return p, unit_dim
    raise TypeError(
        f"clip_grad_agc_: parameters[{index}]: expected a tensor or a (tensor, unit_dim) pair, got "
        f"{type(item).__name__}"
    )


def _check_positive(fn: str, name: str, value: object, allow_zero: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):  # type: ignore[operator]
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{fn}: expected {name} to be a finite number {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


@torch.no_grad()
def clip_grad_agc_(
    parameters: AGCParam | Iterable[AGCParam], clipping: float = 0.01, eps: float = 1e-3
) -> Tensor:
    """Adaptive Gradient Clipping, in place on ``p.grad`` (see the module docstring).

    Args:
        parameters: a tensor, an iterable of tensors, or of ``(tensor, unit_dim)`` pairs (:data:`AGCParam`);
            tensors without a gradient are skipped. Leave the final classifier out (:func:`agc_parameters`).
        clipping: λ, the largest allowed ratio ``‖G_i‖ / max(‖W_i‖, eps)``. Default 0.01 (paper).
        eps: floor of the weight norm, so zero-initialised parameters can move. Default 1e-3 (paper).

    Returns:
        the number of units that were clipped (a 0-dim tensor).

    Example:
        >>> w = torch.tensor([[3.0, 4.0]], requires_grad=True); w.grad = torch.tensor([[0.3, 0.4]])
        >>> int(clip_grad_agc_(w)), w.grad
        (1, tensor([[0.0300, 0.0400]]))
    """
    clipping = _check_positive("clip_grad_agc_", "clipping", clipping, allow_zero=False)
    eps = _check_positive("clip_grad_agc_", "eps", eps, allow_zero=True)
    items = _as_items(parameters)
    count = torch.zeros((), dtype=torch.long)
    for i, item in enumerate(items):
        p, unit_dim = _resolve(item, i)
        if p.grad is None:
            continue
        g = p.grad
        max_norm = unitwise_norm(p.detach(), unit_dim).clamp_min(eps) * clipping
        g_norm = unitwise_norm(g, unit_dim)
        trigger = g_norm > max_norm
        # 1e-6: a division guard only (the branch is taken only where g_norm > max_norm > 0).
        clipped = g * (max_norm / g_norm.clamp_min(1e-6)).to(g.dtype)
        g.copy_(torch.where(trigger, clipped, g))
        count += trigger.sum().to(count.device)
    return count


def _as_items(parameters: object) -> list[Any]:
    if isinstance(parameters, Tensor):
        return [parameters]
    single_pair = (
        isinstance(parameters, tuple)
        and len(parameters) == 2
        and isinstance(parameters[0], Tensor)
        and (parameters[1] is None or isinstance(parameters[1], int))
    )
    if single_pair:
        return [parameters]
    if not isinstance(parameters, Iterable):
        raise TypeError(f"clip_grad_agc_: expected parameters to be a tensor or an iterable, got "
                        f"{type(parameters).__name__}")
    return list(parameters)


def find_classifier(model: nn.Module) -> str:
    """The name of ``model``'s final classifier: the first of ``head``, ``fc``, ``classifier``, ``lm_head`` that is
    a child module with parameters. Raises ``ValueError`` when there is none (say which with ``exclude=``)."""
    for name in CLASSIFIER_NAMES:
        child = getattr(model, name, None)
        if isinstance(child, nn.Module) and any(True for _ in child.parameters()):
            return name
    raise ValueError(
        f"{type(model).__name__} has no child module named one of {list(CLASSIFIER_NAMES)}; pass exclude=[...] with "
        f"the final layer's module name (or exclude=() to clip every parameter)"
    )


def _unit_dim_for(owner: nn.Module, p: Tensor, owner_name: str) -> int | None:
    if p.dim() < 2:
        return None
    if isinstance(owner, nn.modules.conv._ConvTransposeNd):
        if owner.groups != 1:
            raise ValueError(
                f"agc_parameters: {owner_name} is a {type(owner).__name__} with groups={owner.groups}; its weight "
                f"[in, out/groups, *k] has no single output axis"
            )
        return 1
    return 0


def agc_parameters(model: nn.Module, exclude: Iterable[str] | None = None) -> list[tuple[Tensor, int | None]]:
    """The ``(parameter, unit_dim)`` pairs of ``model`` to clip with AGC, leaving out the final classifier.

    Args:
        model: the model.
        exclude: module names whose parameters (their own and their submodules') are not clipped; ``None``
            (default) = the classifier found by :func:`find_classifier`; ``()`` = clip everything. Every name must
            be a module of ``model``.

    Parametrized weights are clipped on their stored tensors (``parametrizations.weight.original``...), with the
    unit axis of the layer they belong to.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"agc_parameters: expected an nn.Module, got {type(model).__name__}")
    if exclude is None:
        excluded = [find_classifier(model)]
    elif isinstance(exclude, str):
        excluded = [exclude]
    else:
        excluded = list(exclude)
    modules = dict(model.named_modules())
    for name in excluded:
        if not isinstance(name, str) or name not in modules or name == "":
            raise ValueError(f"agc_parameters: exclude entry {name!r} is not a submodule name of the model "
                             f"(e.g. {[n for n in modules if n][:8]})")
    out: list[tuple[Tensor, int | None]] = []
    seen: set[int] = set()
    for mod_name, module in modules.items():
        if any(mod_name == e or mod_name.startswith(e + ".") for e in excluded):
            continue
        owner, owner_name = module, mod_name
        if isinstance(module, nn.utils.parametrize.ParametrizationList):
            owner_name = mod_name.rsplit(".parametrizations.", 1)[0] if ".parametrizations." in mod_name else ""
            owner = modules[owner_name]
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            out.append((p, _unit_dim_for(owner, p, owner_name or "model")))
    return out


def attach_agc(
    optimizer: torch.optim.Optimizer,
    parameters: AGCParam | Iterable[AGCParam],
    clipping: float = 0.01,
    eps: float = 1e-3,
) -> RemovableHandle:
    """Make ``optimizer`` apply :func:`clip_grad_agc_` to ``parameters`` before every ``step()`` (a step pre-hook,
    so LR schedulers, ``state_dict`` and the optimizer class are untouched). Returns the hook's handle; call
    ``.remove()`` to stop. Not for closure-based optimizers (LBFGS), whose gradients are computed inside ``step``.

    Example:
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)  # doctest: +SKIP
        >>> attach_agc(opt, agc_parameters(model), clipping=0.01)  # doctest: +SKIP
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach_agc: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    _check_positive("attach_agc", "clipping", clipping, allow_zero=False)
    _check_positive("attach_agc", "eps", eps, allow_zero=True)
    items = _as_items(parameters)
    for i, item in enumerate(items):
        _resolve(item, i)

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        clip_grad_agc_(items, clipping=clipping, eps=eps)

    return optimizer.register_step_pre_hook(hook)
