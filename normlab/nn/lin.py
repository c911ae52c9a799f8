"""LIN and AdaLIN, the Layer-Instance Normalizations of U-GAT-IT (Kim, Kim, Kang, Lee, ICLR 2020,
https://arxiv.org/abs/1907.10830), and the ρ clipper the official code runs after every optimizer step.

Defaults are the official PyTorch code's (``znxlwm/UGATIT-pytorch``, ``ILN`` / ``adaILN``): unbiased variances,
ρ initialised to 0 (LIN) and 0.9 (AdaLIN). ``variant="tf"`` is the official TensorFlow code's
(``taki0112/UGATIT``): biased variances, AdaLIN's ρ initialised to 1 and used as ``clip(ρ − 0.1, 0, 1)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from normlab.functional.lin import ada_lin, lin
from normlab.nn._base import NormBase
from normlab.registry import Paper, register_norm

__all__ = ["LIN", "AdaLIN", "clip_rho_", "register_rho_clipper"]

_PAPER = Paper(
    "U-GAT-IT: Unsupervised Generative Attentional Networks with Adaptive Layer-Instance Normalization for "
    "Image-to-Image Translation",
    "https://arxiv.org/abs/1907.10830",
)
_VARIANTS = ("pytorch", "tf")


class _LayerInstanceNorm(NormBase):
    """What LIN and AdaLIN share: ``ρ``, the variant switch, the clipper."""

    _rho_defaults: dict[str, float]

    def _setup_mix(self, num_features: int, variant: str, rho_init: float | None, eps: float, **factory: Any) -> None:
        name = self._name()
        if variant not in _VARIANTS:
            raise ValueError(f"{name}: expected variant in {_VARIANTS}, got {variant!r}")
        init = self._rho_defaults[variant] if rho_init is None else rho_init
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not 0.0 <= init <= 1.0:
            raise ValueError(f"{name}: expected rho_init in [0, 1], got {rho_init!r}")
        self.variant = variant
        self.rho_init = float(init)
        self.unbiased = variant == "pytorch"
        self.eps = eps
        self.rho = nn.Parameter(torch.empty(num_features, **factory))

    repr_always = ("rho_init",)
    rejects_mask = True

    def clip_rho_(self, low: float = 0.0, high: float = 1.0) -> None:
        """Clamp ``ρ`` into ``[low, high]`` in place (the official ``RhoClipper``; call after each optimizer step)."""
        with torch.no_grad():
            self.rho.clamp_(low, high)


@register_norm(
    "lin", functional=lin, layout="channel_first", aliases=("iln", "layer_instance_norm"),
    paper=_PAPER,
    samples=({"variant": "tf"}, {"rho_init": 0.5, "affine": False}),
    description="per-channel mix rho*IN + (1-rho)*LN, learnt affine (U-GAT-IT)",
)
class LIN(_LayerInstanceNorm):
    r"""Layer-Instance Normalization: a learnt per-channel mix of InstanceNorm and LayerNorm, then an affine.

    Paper: Kim, Kim, Kang, Lee, "U-GAT-IT", https://arxiv.org/abs/1907.10830 (Eq. 5-6; ``ILN`` in the code).

    .. math:: y = \gamma_c \left(\rho_c \hat{x}_I + (1 - \rho_c) \hat{x}_L\right) + \beta_c

    ``x̂_I`` normalises each ``x[n, c]`` over its positions, ``x̂_L`` each ``x[n]`` over ``(C, *)``, both with
    ``eps`` inside the root. No running statistics; train and eval are identical. ``ρ`` should stay in ``[0, 1]``:
    call :meth:`clip_rho_` (or :func:`clip_rho_` on the model, or :func:`register_rho_clipper`) after each optimizer
    step, as the official code does. Not foldable (per-sample statistics).

    Args:
        num_features: channel count ``C``.
        variant: ``"pytorch"`` (default: unbiased variances, the official PyTorch code) or ``"tf"`` (biased
            variances, the official TensorFlow code).
        rho_init: initial ``ρ`` in ``[0, 1]``. Default ``None``: 0, both codes' value.
        eps: default ``1e-5``.
        affine: learn ``weight`` (γ, init 1) and ``bias`` (β, init 0). Default ``True``.
        channel_dim: must be ``1``.

    Shape:
        input ``(N, C, L, *)``; ``variant="pytorch"`` needs more than one position per channel. Output: the input's
        shape and dtype.

    Example:
        >>> m = LIN(2, rho_init=0.9)
        >>> m(torch.tensor([[[[1.0, 3.0]], [[5.0, 7.0]]]])).detach().flatten()  # the spec's vector (unbiased)
        tensor([-0.7526,  0.5977, -0.5977,  0.7526])
    """

    _rho_defaults = {"pytorch": 0.0, "tf": 0.0}

    def __init__(
        self, num_features: int, *, variant: str = "pytorch", rho_init: float | None = None, eps: float = 1e-5,
        affine: bool = True, channel_dim: int = 1, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, channel_dim, "channel_first")
        self._setup_mix(num_features, variant, rho_init, eps, device=device, dtype=dtype)
        self._init_affine(num_features, weight=affine, bias=affine, device=device, dtype=dtype)
        self.reset_parameters()

    def _param_init(self) -> dict[str, float]:
        return {"rho": self.rho_init, "weight": 1.0, "bias": 0.0}


@register_norm(
    "ada_lin", functional=ada_lin, layout="channel_first",
    aliases=("adalin", "ada_iln", "adaptive_layer_instance_norm"),
    paper=_PAPER,
    samples=({"variant": "tf"}, {"rho_init": 0.3}),
    description="per-channel mix rho*IN + (1-rho)*LN with per-sample gamma/beta given to forward (U-GAT-IT)",
)
class AdaLIN(_LayerInstanceNorm):
    r"""Adaptive Layer-Instance Normalization: LIN's mix with ``γ``, ``β`` given per sample (from a style MLP).

    Paper: Kim, Kim, Kang, Lee, "U-GAT-IT", https://arxiv.org/abs/1907.10830 (Eq. 5; ``adaILN`` in the code).

    .. math:: y = \gamma \left(\rho_c \hat{x}_I + (1 - \rho_c) \hat{x}_L\right) + \beta

    ``γ`` and ``β`` are not parameters: pass them to :meth:`forward` as ``gamma=`` / ``beta=``, shape ``(N, C)``
    (one row per sample, as U-GAT-IT's MLP produces them, used as is: no ``1 + γ``) or ``(C,)``. Without them the
    layer returns the mix itself (``γ = 1``, ``β = 0``). ``ρ`` is the only parameter; keep it in ``[0, 1]`` with
    :meth:`clip_rho_` / :func:`register_rho_clipper`. No running statistics; not foldable.

    Args:
        num_features: channel count ``C``.
        variant: ``"pytorch"`` (default: unbiased variances, ``ρ`` init 0.9, the official PyTorch code) or ``"tf"``
            (biased variances, ``ρ`` init 1 used as ``clip(ρ − 0.1, 0, 1)``, the official TensorFlow code's
            ``smoothing=True``).
        rho_init: initial ``ρ`` in ``[0, 1]``. Default ``None``: the variant's.
        eps: default ``1e-5``.
        channel_dim: must be ``1``.

    Shape:
        input ``(N, C, L, *)``; ``gamma``/``beta`` ``(N, C)`` or ``(C,)``; output the input's shape and dtype.

    Example:
        >>> m = AdaLIN(2)
        >>> x, gamma, beta = torch.randn(4, 2, 8, 8), torch.rand(4, 2), torch.randn(4, 2)
        >>> m(x, gamma=gamma, beta=beta).shape
        torch.Size([4, 2, 8, 8])
    """

    _rho_defaults = {"pytorch": 0.9, "tf": 1.0}

    def __init__(
        self, num_features: int, *, variant: str = "pytorch", rho_init: float | None = None, eps: float = 1e-5,
        channel_dim: int = 1, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, channel_dim, "channel_first")
        self._setup_mix(num_features, variant, rho_init, eps, device=device, dtype=dtype)
        self.smoothing = variant == "tf"
        self.reset_parameters()

    def _param_init(self) -> dict[str, float]:
        return {"rho": self.rho_init}

    def _functional_arg(self, name: str) -> Any:
        if name in ("gamma", "beta"):
            return None  # given to forward, not held by the module
        return super()._functional_arg(name)

    def forward(  # type: ignore[override]
        self, x: Tensor, mask: Tensor | None = None, *, gamma: Tensor | None = None, beta: Tensor | None = None
    ) -> Tensor:
        """``x`` normalised and mixed, scaled by ``gamma`` and shifted by ``beta`` (both optional, see the class)."""
        if mask is not None:
            return super().forward(x, mask)  # raises
        kwargs = self.functional_kwargs()
        kwargs.update(gamma=gamma, beta=beta)
        return ada_lin(x, **kwargs)


def clip_rho_(model: nn.Module, low: float = 0.0, high: float = 1.0) -> int:
    """Clamp ``ρ`` of every LIN / AdaLIN in ``model`` into ``[low, high]`` in place (the official ``RhoClipper``,
    applied after each optimizer step); returns how many norms it clipped."""
    count = 0
    for m in model.modules():
        if isinstance(m, _LayerInstanceNorm):
            m.clip_rho_(low, high)
            count += 1
    return count


def register_rho_clipper(optimizer: torch.optim.Optimizer, model: nn.Module) -> Callable[[], None]:
    """Run :func:`clip_rho_` on ``model`` after every ``optimizer.step()``; returns a function that stops it."""

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        clip_rho_(model)

    handle = optimizer.register_step_post_hook(hook)
    return handle.remove
