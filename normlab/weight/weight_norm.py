"""Weight Normalization with the data-dependent initialisation of Salimans & Kingma, "Weight Normalization: A Simple
Reparameterization to Accelerate Training of Deep Neural Networks" (NeurIPS 2016), https://arxiv.org/abs/1602.07868.

The reparameterization itself is PyTorch's ``torch.nn.utils.parametrizations.weight_norm`` (``w = g · v/‖v‖``,
state-dict names ``parametrizations.weight.original0`` = g and ``original1`` = v), so checkpoints stay
interchangeable with plain PyTorch. What PyTorch lacks is the paper's initialisation (§3): run one minibatch and set
``g`` and the bias so every unit's pre-activation has mean 0 and variance 1 on it, layer by layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as _torch_weight_norm

__all__ = ["data_dependent_init_", "weight_norm", "weight_norm_layers"]

_WN = torch.nn.utils.parametrizations._WeightNorm
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    """``torch.nn.utils.parametrizations.weight_norm`` with argument checks: ``g`` = ``original0`` (shape
    ``(O, 1, ...)`` for ``dim=0``), ``v`` = ``original1``. Returns the module."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"weight_norm: expected an nn.Module, got {type(module).__name__}")
    w = getattr(module, name, None)
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise ValueError(f"weight_norm: {type(module).__name__} has no floating-point tensor attribute {name!r}")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or not -w.dim() <= dim < w.dim()):
        raise ValueError(f"weight_norm: expected dim None or in [-{w.dim()}, {w.dim()}) for {name} of shape "
                         f"{list(w.shape)}, got {dim!r}")
    return _torch_weight_norm(module, name=name, dim=dim)  # type: ignore[arg-type]  # torch accepts None


def _wn_of(module: nn.Module) -> Any:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist: Any = getattr(module, "parametrizations").weight  # noqa: B009
    found = [p for p in plist if isinstance(p, _WN)]
    return found[0] if len(plist) == 1 and found else None


def weight_norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The ``nn.Linear`` / ``nn.ConvNd`` modules of ``model`` whose ``weight`` has (only) PyTorch's weight-norm
    parametrization, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _LAYERS) and _wn_of(m) is not None}


def _unit_axis(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


@torch.no_grad()
def data_dependent_init_(
    model: nn.Module,
    *inputs: Any,
    v_std: float | None = 0.05,
    eps: float = 1e-10,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> list[str]:
    """Data-dependent init of every weight-normalised layer of ``model`` from one minibatch (paper §3).

    Runs ``model(*inputs, **kwargs)`` once. Each weight-normalised ``nn.Linear`` / ``nn.ConvNd``, the first time it
    is called: (if ``v_std`` is not None) draws ``v ~ N(0, v_std²)`` and sets ``g = 1``; computes its output without
    bias ``y`` on the input it receives; takes per output unit the mean ``μ`` and biased std ``σ`` of ``y`` (over
    every axis but the unit axis: ``N`` for a linear, ``N, H, W`` for a conv); sets ``g ← g/σ``, bias ``← −μ/σ``;
    and passes the re-initialised output on. Layers are thus initialised one after the other in forward order, each
    on the already standardized output of the ones before (the paper's layer-by-layer procedure). A layer without a
    bias gets only the ``g`` update.

    Weight norm must use ``dim=0`` (one ``g`` per output unit). Other modules run as usual — BatchNorm layers in
    training mode update their running statistics.

    Args:
        model: the model (or a single layer).
        inputs, kwargs: the minibatch, passed to ``model``.
        v_std: std of the fresh direction ``v`` (paper: 0.05), or ``None`` to keep the current ``v`` and ``g``.
        eps: added to the variance before the square root (a division guard for dead units).
        generator: for the draw of ``v``.

    Returns:
        the names of the layers initialised, in forward order.

    Raises:
        ValueError: no weight-normalised layer, a layer with ``dim != 0``, or layers the forward never called.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"data_dependent_init_: expected an nn.Module, got {type(model).__name__}")
    if v_std is not None and (isinstance(v_std, bool) or not isinstance(v_std, (int, float)) or not v_std > 0):
        raise ValueError(f"data_dependent_init_: expected v_std to be a number > 0 or None, got {v_std!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"data_dependent_init_: expected eps to be a finite number >= 0, got {eps!r}")
    layers = weight_norm_layers(model)
    if not layers:
        raise ValueError(
            "data_dependent_init_: the model has no nn.Linear/nn.ConvNd with a weight_norm parametrization "
            "(wrap layers with normlab.weight.weight_norm first)"
        )
    for name, m in layers.items():
        if _wn_of(m).dim != 0:
            raise ValueError(f"data_dependent_init_: {name} uses weight_norm dim={_wn_of(m).dim}; the init needs "
                             f"dim=0 (one g per output unit)")
    done: list[str] = []
    handles_by_name: dict[str, Any] = {}

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            handles_by_name[name].remove()
            done.append(name)
            return _init_layer(module, args, v_std, eps, generator)

        return hook

    for name, m in layers.items():
        handles_by_name[name] = m.register_forward_hook(make_hook(name))
    try:
        model(*inputs, **kwargs)
    finally:
        for h in handles_by_name.values():
            h.remove()
    missing = [n for n in layers if n not in done]
    if missing:
        raise ValueError(
            f"data_dependent_init_: the forward never called {missing}; they were left as they were "
            f"(initialised: {done})"
        )
    return done


def _init_layer(
    module: nn.Module, args: tuple[Any, ...], v_std: float | None, eps: float, generator: torch.Generator | None
) -> Tensor:
    plist: Any = getattr(module, "parametrizations").weight  # noqa: B009
    g, v = plist.original0, plist.original1
    if v_std is not None:
        v.copy_(torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device) * v_std)
        g.fill_(1.0)
    bias = getattr(module, "bias", None)
    bias = bias if isinstance(bias, Tensor) else None
    if bias is not None:
        bias.zero_()
    y = module.forward(*args)  # .forward: no hooks, so this is the output without bias
    axis = _unit_axis(module) % y.dim()
    dims = tuple(d for d in range(y.dim()) if d != axis)
    var, mean = torch.var_mean(y.float(), dim=dims, correction=0)
    std = (var + eps).sqrt()
    if not bool(torch.isfinite(std).all()) or bool((std == 0).any()):
        raise ValueError(f"data_dependent_init_: {type(module).__name__} has output units with zero or non-finite "
                         f"std on this batch; pass eps > 0 or a batch that reaches every unit")
    g.div_(std.reshape(g.shape).to(g.dtype))
    if bias is not None:
        bias.copy_((-mean / std).to(bias.dtype))
    return module.forward(*args)
