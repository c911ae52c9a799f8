"""Fixed-scale LayerNorm ("FakeLayerNorm"), the switchable LayerNorm of LayerNorm removal by fine-tuning (Baroni et al.
2025, "Transformers Don't Need LayerNorm at Inference Time", https://arxiv.org/abs/2507.02559)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normlab.functional.fixed_scale_layer_norm import fixed_scale_layer_norm
from normlab.nn._base import NormBase, check_num_features, check_unit
from normlab.registry import Paper, register_norm

__all__ = ["FakeLayerNorm"]


@register_norm(
    "fixed_scale_layer_norm", functional=fixed_scale_layer_norm, layout="token", aliases=("fake_layer_norm", "fake_ln"),
    paper=Paper("Transformers Don't Need LayerNorm at Inference Time", "https://arxiv.org/abs/2507.02559"),
    samples=({"fixed": True, "sigma": 1.7}, {"fixed": True, "bias": False}, {"affine": False, "fixed": True}),
    description="LayerNorm whose per-token std is switched to a fixed scalar σ̄ (LN removal by fine-tuning)",
)
class FakeLayerNorm(NormBase):
    r"""LayerNorm with a switch that replaces the per-token standard deviation by a constant ``σ̄``.

    Paper: Baroni, Khara, Schaeffer, Subkhankulov, Heimersheim, "Transformers Don't Need LayerNorm at Inference
    Time", 2025, https://arxiv.org/abs/2507.02559 (the ``FakeLayerNorm`` of the authors' ``train.py``).

    .. math::
        y = \begin{cases}
            \gamma \odot \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta & \text{fixed = False} \\
            \gamma \odot \frac{x - \mathrm{E}[x]}{\bar\sigma} + \beta & \text{fixed = True}
        \end{cases}

    With ``fixed=True`` the norm is linear in ``x`` (the centring stays; it is linear), so after fine-tuning it folds
    into the adjacent weights (:func:`normlab.surgery.export_removed_ln`). ``sigma`` is a buffer (one scalar per norm,
    estimated from calibration batches by :func:`normlab.surgery.calibrate_sigma`); ``fixed`` is saved in the state
    dict (``_extra_state``), so a checkpoint taken in the middle of a removal schedule keeps its switches.

    Args:
        normalized_shape: channel count ``C`` (the last axis).
        eps: LayerNorm's eps (real mode only). Default: ``1e-5``.
        affine: learn ``weight`` (γ, init 1). Default: ``True``.
        bias: learn ``bias`` (β, init 0) when ``affine``. Default: ``True``.
        sigma: initial value of the ``sigma`` buffer σ̄. Default: ``1.0``.
        fixed: start in fixed-scale mode. Default: ``False`` (an ordinary LayerNorm).
        momentum: while real and training, track σ̄ as the authors' code does with ``EXP_RECOMPUTE_STD_ON_REAL``:
            ``σ̄ ← momentum·σ̄ + (1 − momentum)·mean_t std_t`` (std_t: each token's biased std, eps inside), so σ̄ is
            frozen at its current value when the norm is switched. Default: ``None`` (σ̄ stays where calibration put it).
        channel_dim: accepted for the shared norm conventions; a token norm, so only ``-1``.

    Shape:
        input ``(*, C)``; output the same shape. Float16/bfloat16 inputs are computed in float32 and returned in their
        own dtype.

    Example:
        >>> m = FakeLayerNorm(4, sigma=2.0, fixed=True)
        >>> m(torch.tensor([1.0, 2.0, 3.0, 6.0]))
        tensor([-1.0000, -0.5000,  0.0000,  1.5000])
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int] | list[int],
        *,
        eps: float = 1e-5,
        affine: bool = True,
        bias: bool = True,
        sigma: float = 1.0,
        fixed: bool = False,
        momentum: float | None = None,
        channel_dim: int = -1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, (tuple, list)) and len(normalized_shape) == 1:
            normalized_shape = int(normalized_shape[0])
        n = check_num_features("fixed_scale_layer_norm", normalized_shape)
        if not isinstance(fixed, bool):
            raise TypeError(f"fixed_scale_layer_norm: expected fixed to be a bool, got {type(fixed).__name__}")
        if not float(sigma) > 0:
            raise ValueError(f"fixed_scale_layer_norm: expected sigma > 0, got {sigma!r}")
        self._setup(n, channel_dim, "token")
        self.normalized_shape = n
        self.eps = eps
        self.fixed = fixed
        self.momentum = check_unit("fixed_scale_layer_norm", "momentum", momentum, optional=True)
        self._init_affine(n, weight=affine, bias=affine and bias, device=device, dtype=dtype)
        self._init_stats([("sigma", (), float(sigma))], device=device, dtype=dtype)
        self.reset_parameters()

    sigma: Tensor

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.training and not self.fixed and self.momentum is not None:
            with torch.no_grad():
                xs = x.detach().float()
                std = (xs.var(-1, unbiased=False) + self.eps).sqrt()
                if mask is not None and tuple(mask.shape) == tuple(std.shape):
                    std = std[mask.bool()]
                if std.numel() > 0:
                    m = self.momentum
                    self.sigma.copy_(m * self.sigma + (1 - m) * std.mean().to(self.sigma.dtype))
        return super().forward(x, mask)

    def get_extra_state(self) -> dict[str, Any]:
        return {"fixed": self.fixed}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and isinstance(state.get("fixed"), bool):
            self.fixed = state["fixed"]

    @classmethod
    def from_layer_norm(
        cls, norm: nn.Module, sigma: float = 1.0, *, fixed: bool = False, momentum: float | None = None
    ) -> FakeLayerNorm:
        """A ``FakeLayerNorm`` computing what ``norm`` (a ``torch.nn.LayerNorm`` or normlab ``LayerNorm`` over the
        last axis) computes, sharing nothing with it (γ, β copied), on the same device and dtype."""
        shape = getattr(norm, "normalized_shape", None)
        dims = shape if isinstance(shape, tuple) else (shape,)
        if len(dims) != 1 or getattr(norm, "channel_dim", -1) != -1:
            raise TypeError(
                f"FakeLayerNorm.from_layer_norm: expected a LayerNorm over the last axis, got {type(norm).__name__} "
                f"with normalized_shape={shape}"
            )
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        like = weight if isinstance(weight, Tensor) else None
        new = cls(
            int(dims[0]), eps=float(getattr(norm, "eps")), affine=weight is not None,  # noqa: B009
            bias=bias is not None, sigma=sigma, fixed=fixed, momentum=momentum,
            device=like.device if like is not None else None, dtype=like.dtype if like is not None else None,
        )
        with torch.no_grad():
            for name, src in (("weight", weight), ("bias", bias)):
                if isinstance(src, Tensor):
                    getattr(new, name).copy_(src)
        return new
