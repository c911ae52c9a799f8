"""Weight Standardization and Scaled Weight Standardization as ``torch.nn.utils.parametrize`` parametrizations and
as conv layers.

* Weight Standardization (WS): Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel
  Normalization and Weight Standardization" (2019), https://arxiv.org/abs/1903.10520 — every output unit's weight
  row is centred and divided by its standard deviation.
* Scaled WS: Brock, De, Smith, "Characterizing signal propagation to close the performance gap in unnormalized
  ResNets" (ICLR 2021), https://arxiv.org/abs/2101.08692, §4 — the row is additionally scaled by ``fan_in^(-1/2)``
  and a learnable per-unit gain, so a conv keeps unit-variance signals without a norm layer (NF-ResNets, NFNets).

Both are functions of the weight alone: no state, identical in train and eval mode; at inference the standardized
weight can be computed once (:func:`bake_weights`). The output axis of a weight is dim 0 (``nn.Linear`` ``(O, I)``,
``nn.ConvNd`` ``(O, I/groups, *k)``); the statistics of unit ``o`` are taken over all of ``weight[o]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "SCALED_WS_VARIANTS",
    "WS_VARIANTS",
    "ScaledStdConv2d",
    "ScaledWeightStandardization",
    "WSConv2d",
    "WeightStandardization",
    "bake_weights",
    "scaled_standardize_weight",
    "scaled_weight_standardization",
    "standardize_weight",
    "weight_standardization",
]


@dataclass(frozen=True)
class _WSVariant:
    unbiased: bool
    eps_inside: bool
    eps: float


# WS as published in code: the paper's PyTorch snippet (unbiased std, eps added to the std), its TF snippet (biased
# std, eps added to the std), the Batch-Channel Normalization code (unbiased variance, eps under the square root)
# and timm's StdConv2d for BiT (biased variance, eps 1e-6 under the square root).
WS_VARIANTS: dict[str, _WSVariant] = {
    "official": _WSVariant(unbiased=True, eps_inside=False, eps=1e-5),
    "tf": _WSVariant(unbiased=False, eps_inside=False, eps=1e-5),
    "bcn": _WSVariant(unbiased=True, eps_inside=True, eps=1e-5),
    "timm": _WSVariant(unbiased=False, eps_inside=True, eps=1e-6),
}
# Scaled WS: DeepMind's WSConv2D divides by sqrt(max(N·Var, eps)) with eps 1e-4; timm's ScaledStdConv2d divides by
# sqrt(Var + eps) and multiplies by N^(-1/2), eps 1e-6.
SCALED_WS_VARIANTS: dict[str, float] = {"deepmind": 1e-4, "timm": 1e-6}

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_variant(fn: str, variant: object, table: Sequence[str]) -> str:
    if not isinstance(variant, str) or variant not in table:
        raise ValueError(f"{fn}: expected variant to be one of {sorted(table)}, got {variant!r}")
    return variant


def _check_eps(fn: str, eps: object, default: float) -> float:
    if eps is None:
        return default
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{fn}: expected eps to be a finite number > 0, got {eps!r}")
    return float(eps)


def _check_weight(fn: str, weight: object) -> Tensor:
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        got = f"dtype {weight.dtype}" if isinstance(weight, Tensor) else type(weight).__name__
        raise TypeError(f"{fn}: expected weight to be a floating-point tensor, got {got}")
    if weight.dim() < 2:
        raise ValueError(
            f"{fn}: expected a weight with an output axis (dim 0) and at least one input axis, i.e. [O, *], "
            f"got shape {list(weight.shape)}"
        )
    fan_in = math.prod(weight.shape[1:])
    if fan_in < 2:
        raise ValueError(
            f"{fn}: every output unit needs a fan-in >= 2 to be standardized (a single entry centres to 0), got "
            f"weight of shape {list(weight.shape)} with fan-in {fan_in}"
        )
    return weight


def _centre(weight: Tensor) -> tuple[Tensor, tuple[int, ...], int]:
    w = weight.float() if weight.dtype in _LOW_PRECISION else weight
    dims = tuple(range(1, w.dim()))
    return w - w.mean(dim=dims, keepdim=True), dims, math.prod(w.shape[1:])


def _std_with_finite_grad(var: Tensor) -> Tensor:
    # sqrt(var) with the value of torch.sqrt but a zero (not NaN) gradient where var == 0: a constant filter gives
    # NaN gradients with eps outside the square root in the official code (WeightStandardization issues #1, #16).
    positive = var > 0
    safe = torch.where(positive, var, torch.ones_like(var))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(var))


def standardize_weight(weight: Tensor, *, eps: float | None = None, variant: str = "official") -> Tensor:
    """Weight Standardization ``Ŵ_o = (W_o − mean(W_o)) / (std(W_o) + eps)`` per output unit (see
    :class:`WeightStandardization` for the variants). Half-precision weights are standardized in float32 and cast
    back."""
    fn = "standardize_weight"
    v = WS_VARIANTS[_check_variant(fn, variant, tuple(WS_VARIANTS))]
    eps = _check_eps(fn, eps, v.eps)
    weight = _check_weight(fn, weight)
    centred, dims, fan_in = _centre(weight)
    var = centred.pow(2).sum(dim=dims, keepdim=True) / (fan_in - 1 if v.unbiased else fan_in)
    denom = (var + eps).sqrt() if v.eps_inside else _std_with_finite_grad(var) + eps
    return (centred / denom).to(weight.dtype)


def scaled_standardize_weight(
    weight: Tensor,
    gain: Tensor | None = None,
    *,
    eps: float | None = None,
    variant: str = "deepmind",
    gamma: float = 1.0,
) -> Tensor:
    """Scaled WS ``Ŵ_o = gain_o · γ · (W_o − μ_o) / sqrt(max(N·Var_b(W_o), eps))`` (``variant="deepmind"``) or
    ``gain_o · γ · N^(-1/2) · (W_o − μ_o) / sqrt(Var_b(W_o) + eps)`` (``variant="timm"``), N = fan-in; see
    :class:`ScaledWeightStandardization`."""
    fn = "scaled_standardize_weight"
    variant = _check_variant(fn, variant, tuple(SCALED_WS_VARIANTS))
    eps = _check_eps(fn, eps, SCALED_WS_VARIANTS[variant])
    weight = _check_weight(fn, weight)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ValueError(f"{fn}: expected gamma to be a finite number, got {gamma!r}")
    if gain is not None and (not isinstance(gain, Tensor) or gain.numel() != weight.shape[0]):
        got = list(gain.shape) if isinstance(gain, Tensor) else type(gain).__name__
        raise ValueError(f"{fn}: expected gain with {weight.shape[0]} entries (one per output unit), got {got}")
    centred, dims, fan_in = _centre(weight)
    var = centred.pow(2).mean(dim=dims, keepdim=True)
    if variant == "deepmind":
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=eps))
    else:
        scale = torch.rsqrt(var + eps) * fan_in**-0.5
    out = centred * (scale * gamma)
    if gain is not None:
        out = out * gain.reshape((-1,) + (1,) * (weight.dim() - 1)).to(out.dtype)
    return out.to(weight.dtype)


class WeightStandardization(nn.Module):
    r"""Parametrization ``W ↦ Ŵ``: Weight Standardization per output unit (dim 0).

    Paper: Qiao et al., https://arxiv.org/abs/1903.10520 (§3, Eq. 5).

    .. math:: \hat W_{o} = \frac{W_{o} - \mu_{o}}{\sigma_{o} + \epsilon}

    mean and std over all entries of ``W[o]`` (``I/groups · kh · kw`` for a conv). No parameters, no state. Meant
    for weights followed by a normalization layer (BN, GN, BCN); without one use Scaled WS.

    Args:
        eps: default by variant.
        variant: ``"official"`` (default; the paper's PyTorch code: unbiased std, ``eps=1e-5`` added to the std),
            ``"tf"`` (its TF code: biased std, added), ``"bcn"`` (the BCN code: ``sqrt(Var_u + 1e-5)``) or
            ``"timm"`` (``StdConv2d``: ``sqrt(Var_b + 1e-6)``).

    With eps outside the square root the gradient of a constant filter is taken as 0 where the official code
    gives NaN (the value is the same).

    Example:
        >>> conv = weight_standardization(nn.Conv2d(3, 8, 3))
        >>> float(conv.weight[0].mean()) == 0.0  # doctest: +SKIP
    """

    def __init__(self, *, eps: float | None = None, variant: str = "official") -> None:
        super().__init__()
        self.variant = _check_variant("WeightStandardization", variant, tuple(WS_VARIANTS))
        self.eps = _check_eps("WeightStandardization", eps, WS_VARIANTS[self.variant].eps)

    def forward(self, weight: Tensor) -> Tensor:
        return standardize_weight(weight, eps=self.eps, variant=self.variant)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, variant={self.variant!r}"


class ScaledWeightStandardization(nn.Module):
    r"""Parametrization ``W ↦ Ŵ``: Scaled Weight Standardization with a learnable gain per output unit.

    Paper: Brock, De, Smith, https://arxiv.org/abs/2101.08692 (§4, Eq. 3); NFNets https://arxiv.org/abs/2102.06171.

    .. math:: \hat W_{o} = g_o \,\gamma\, \frac{W_{o} - \mu_{o}}{\sqrt{\max(N\,\mathrm{Var}(W_{o}), \epsilon)}}

    ``N`` = fan-in, ``Var`` biased. ``γ`` is a constant: DeepMind's code keeps it 1 and puts the nonlinearity's
    gain into the activation (:class:`normlab.weight.ScaledActivation`); timm passes it here.

    Args:
        out_features: output units (``weight.shape[0]``); ``gain`` has this many entries.
        eps: default ``1e-4`` (``"deepmind"``) or ``1e-6`` (``"timm"``).
        variant: ``"deepmind"`` (default, ``max(N·Var, eps)``) or ``"timm"`` (``N^(-1/2)/sqrt(Var + eps)``).
        gamma: constant factor. Default 1.
        gain_init: initial gain (timm uses 0 on a block's last conv to emulate SkipInit). Default 1.
    """

    def __init__(
        self,
        out_features: int,
        *,
        eps: float | None = None,
        variant: str = "deepmind",
        gamma: float = 1.0,
        gain_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fn = "ScaledWeightStandardization"
        if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
            raise ValueError(f"{fn}: expected out_features to be an int >= 1, got {out_features!r}")
        self.variant = _check_variant(fn, variant, tuple(SCALED_WS_VARIANTS))
        self.eps = _check_eps(fn, eps, SCALED_WS_VARIANTS[self.variant])
        for name, value in (("gamma", gamma), ("gain_init", gain_init)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{fn}: expected {name} to be a finite number, got {value!r}")
        self.gamma = float(gamma)
        self.gain_init = float(gain_init)
        self.gain = nn.Parameter(torch.full((out_features,), self.gain_init, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gain.fill_(self.gain_init)

    def forward(self, weight: Tensor) -> Tensor:
        if weight.dim() >= 1 and weight.shape[0] != self.gain.numel():
            raise ValueError(
                f"ScaledWeightStandardization: built for {self.gain.numel()} output units, got weight of shape "
                f"{list(weight.shape)}"
            )
        return scaled_standardize_weight(weight, self.gain, eps=self.eps, variant=self.variant, gamma=self.gamma)

    def extra_repr(self) -> str:
        return f"{self.gain.numel()}, eps={self.eps}, variant={self.variant!r}, gamma={self.gamma}"


def _check_target(fn: str, module: object, name: str) -> Tensor:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(module).__name__}")
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise ValueError(
            f"{fn}: {type(module).__name__} stores its weight as [in, out/groups, *k] (output axis 1); only layers "
            f"whose output axis is dim 0 (nn.Linear, nn.ConvNd) are supported"
        )
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"{fn}: {type(module).__name__} has no tensor attribute {name!r}")
    return _check_weight(f"{fn} ({type(module).__name__}.{name})", weight)


def weight_standardization(
    module: nn.Module, name: str = "weight", *, eps: float | None = None, variant: str = "official"
) -> nn.Module:
    """Register :class:`WeightStandardization` on ``module.<name>`` (as ``torch.nn.utils.parametrizations.
    weight_norm`` does) and return the module. The raw weight is ``module.parametrizations.<name>.original``."""
    _check_target("weight_standardization", module, name)
    parametrize.register_parametrization(module, name, WeightStandardization(eps=eps, variant=variant))
    return module


def scaled_weight_standardization(
    module: nn.Module,
    name: str = "weight",
    *,
    eps: float | None = None,
    variant: str = "deepmind",
    gamma: float = 1.0,
    gain_init: float = 1.0,
) -> nn.Module:
    """Register :class:`ScaledWeightStandardization` on ``module.<name>`` and return the module; the gain is
    ``module.parametrizations.<name>[0].gain``."""
    w = _check_target("scaled_weight_standardization", module, name)
    p = ScaledWeightStandardization(
        w.shape[0], eps=eps, variant=variant, gamma=gamma, gain_init=gain_init, device=w.device, dtype=w.dtype
    )
    parametrize.register_parametrization(module, name, p)
    return module


def _raw_weight(module: nn.Module) -> Tensor:
    """The stored weight tensor of a layer: ``parametrizations.weight.original`` when parametrized."""
    holder: Any = getattr(module, "parametrizations").weight if parametrize.is_parametrized(module, "weight") else None  # noqa: B009
    w = holder.original if holder is not None else getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"{type(module).__name__} has no stored weight tensor")
    return w


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with :class:`WeightStandardization` registered on ``weight`` (``conv.weight`` is the
    standardized weight; the stored one is ``conv.parametrizations.weight.original``).

    Takes ``nn.Conv2d``'s arguments plus keyword-only ``eps`` and ``variant`` (default ``"official"``).

    Example:
        >>> conv = WSConv2d(3, 8, 3, padding=1, bias=False)
        >>> conv(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(self, *args: object, eps: float | None = None, variant: str = "official", **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        weight_standardization(self, eps=eps, variant=variant)

    def reset_parameters(self) -> None:
        # nn.Conv2d's init written into the stored weight (writing into the computed one would be lost).
        w = _raw_weight(self)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(math.prod(w.shape[1:]))
            nn.init.uniform_(self.bias, -bound, bound)


class ScaledStdConv2d(nn.Conv2d):
    """``nn.Conv2d`` with :class:`ScaledWeightStandardization` on ``weight`` (DeepMind ``WSConv2D`` by default).

    Takes ``nn.Conv2d``'s arguments plus keyword-only ``eps``, ``variant`` (``"deepmind"`` or ``"timm"``),
    ``gamma`` and ``gain_init``. Init as DeepMind's: stored weight ``N(0, 1/fan_in)``, bias 0, gain ``gain_init``.
    The gain is ``conv.gain`` (stored as ``parametrizations.weight.0.gain``).

    Example:
        >>> conv = ScaledStdConv2d(3, 8, 3, padding=1)
        >>> conv(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(
        self,
        *args: object,
        eps: float | None = None,
        variant: str = "deepmind",
        gamma: float = 1.0,
        gain_init: float = 1.0,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        scaled_weight_standardization(self, eps=eps, variant=variant, gamma=gamma, gain_init=gain_init)
        self.reset_parameters()

    @property
    def gain(self) -> Tensor:
        plist: Any = getattr(self, "parametrizations").weight  # noqa: B009
        return plist[0].gain

    def reset_parameters(self) -> None:
        w = _raw_weight(self)
        nn.init.normal_(w, 0.0, math.prod(w.shape[1:]) ** -0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if parametrize.is_parametrized(self, "weight"):
            plist: Any = getattr(self, "parametrizations").weight  # noqa: B009
            plist[0].reset_parameters()


_BAKEABLE = (WeightStandardization, ScaledWeightStandardization)


def bake_weights(model: nn.Module) -> list[str]:
    """Replace every WS / Scaled WS / ``torch`` weight-norm parametrization in ``model`` by its current value
    (``remove_parametrizations(..., leave_parametrized=True)``), so ``module.weight`` is a plain parameter again —
    for inference, and before ``normlab.surgery.fold_norms``, which refuses parametrized layers. A
    :class:`WSConv2d` / :class:`ScaledStdConv2d` left without parametrizations becomes a plain ``nn.Conv2d``.

    Returns:
        the ``"module.tensor"`` names that were baked.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bake_weights: expected an nn.Module, got {type(model).__name__}")
    wn = getattr(torch.nn.utils.parametrizations, "_WeightNorm", ())
    baked = []
    for mod_name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in list(module.parametrizations.items()):  # type: ignore[union-attr,operator]
            if all(isinstance(p, _BAKEABLE + (wn,)) for p in plist):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
                baked.append(f"{mod_name}.{tensor_name}" if mod_name else tensor_name)
        if type(module) in (WSConv2d, ScaledStdConv2d) and not parametrize.is_parametrized(module):
            # A plain nn.Conv2d now, so torch.fx (and fold_norms) see an ordinary leaf conv.
            module.__class__ = nn.Conv2d
    return baked
