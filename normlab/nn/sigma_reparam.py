"""σReparam linear layer: spectral reparameterisation ``Ŵ = (γ / σ(W)) W`` of Zhai et al., "Stabilizing
Transformer Training by Preventing Attention Entropy Collapse" (ICML 2023, https://arxiv.org/abs/2303.06296).

This is a linear layer, not a norm: it is not registered in :mod:`normlab.registry`. The spectral norm σ(W) is
estimated with one step of power iteration per training forward, as in the paper's official PyTorch code
(apple/ml-sigma-reparam, ``vision/layers.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SigmaReparamLinear", "spectral_norm_estimate"]


def spectral_norm_estimate(weight: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One power-iteration step for the top singular value of a 2-D ``weight`` (see :class:`SigmaReparamLinear`).

    ``v = normalize(W u)``, ``u' = normalize(Wᵀ v)`` (no gradient), ``σ̂ = vᵀ W u'`` (differentiable in ``W``).

    Returns:
        ``(sigma, u_new, v)``.
    """
    with torch.no_grad():
        v = F.normalize(weight @ u, dim=0)
        u_new = F.normalize(weight.t() @ v, dim=0)
    sigma = torch.dot(v, weight @ u_new)
    return sigma, u_new, v


class SigmaReparamLinear(nn.Module):
    r"""Linear layer with σReparam: ``y = x (γ W / σ(W))ᵀ + b``.

    Paper: Zhai et al., https://arxiv.org/abs/2303.06296.

    ``γ`` is one learnable scalar; ``σ(W)`` is the spectral norm of ``weight``, estimated by power iteration with a
    persistent right-singular-vector buffer ``u`` (initialised from an exact SVD). In training mode every forward
    does ``n_power_iterations`` steps ``v = normalize(W u)``, ``u ← normalize(Wᵀ v)`` without gradient and uses the
    differentiable ``σ̂ = vᵀ W u``; ``u`` and the ``sigma`` buffer are updated. In eval mode ``u`` is not updated and
    ``σ̂ = ‖W u‖``. The bias is not reparameterised.

    The attributes ``in_features``, ``out_features``, ``weight`` and ``bias`` are named as in ``torch.nn.Linear``,
    but this is deliberately **not** an ``nn.Linear`` subclass: ``weight`` is not the effective weight, so code that
    rewrites ``nn.Linear`` weights (norm folding) must not treat it as one. Use :meth:`effective_weight`.

    Args:
        in_features: input width.
        out_features: output width.
        bias: learn an additive bias. Default ``True``.
        gamma_init: ``"sigma"`` (default; the vision reference: ``γ = σ(W₀)`` so the layer starts as the plain linear
            ``W₀``) or ``"one"`` (the speech reference: spectral norm 1 at init).
        n_power_iterations: power-iteration steps per training forward. Default ``1``.

    Shape:
        input ``(*, in_features)``, output ``(*, out_features)``.

    Example:
        >>> lin = SigmaReparamLinear(8, 4)
        >>> lin(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        gamma_init: str = "sigma",
        n_power_iterations: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SigmaReparamLinear: expected {name} to be an int >= 1, got {value!r}")
        if gamma_init not in ("sigma", "one"):
            raise ValueError(f"SigmaReparamLinear: expected gamma_init 'sigma' or 'one', got {gamma_init!r}")
        if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 1:
            raise ValueError(f"SigmaReparamLinear: expected n_power_iterations >= 1, got {n_power_iterations!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.gamma_init = gamma_init
        self.n_power_iterations = n_power_iterations
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))  # type: ignore[arg-type]
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None  # type: ignore[arg-type]
        self.gamma = nn.Parameter(torch.empty((), **factory))  # type: ignore[arg-type]
        self.register_buffer("u", torch.empty(in_features, **factory))  # type: ignore[arg-type]
        self.register_buffer("sigma", torch.empty((), **factory))  # type: ignore[arg-type]
        self.reset_parameters()

    u: Tensor
    sigma: Tensor

    def reset_parameters(self) -> None:
        """``torch.nn.Linear``'s default init, then :meth:`reset_sigma`."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_sigma()

    @torch.no_grad()
    def reset_sigma(self) -> None:
        """Set ``u`` to the exact top right-singular vector of the current ``weight``, ``sigma`` to σ(W) and γ by
        ``gamma_init``. Call it after re-initialising ``weight`` by hand (the models do)."""
        w = self.weight.detach().to(torch.float64)
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        self.u.copy_(vh[0].to(self.u.dtype))
        self.sigma.fill_(float(s[0]))
        self.gamma.fill_(float(s[0]) if self.gamma_init == "sigma" else 1.0)

    def _sigma(self) -> Tensor:
        if self.training:
            u = self.u
            with torch.no_grad():
                for _ in range(self.n_power_iterations - 1):
                    u = F.normalize(self.weight.t() @ F.normalize(self.weight @ u, dim=0), dim=0)
            sigma, u_new, _ = spectral_norm_estimate(self.weight, u)
            with torch.no_grad():
                self.u.copy_(u_new)
                self.sigma.copy_(sigma.detach())
            return sigma
        return torch.linalg.vector_norm(self.weight @ self.u)

    def effective_weight(self) -> Tensor:
        """``γ W / σ̂`` as used by the forward (in train mode this runs power iteration and updates ``u``)."""
        return self.weight * (self.gamma / self._sigma())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"gamma_init={self.gamma_init!r}, n_power_iterations={self.n_power_iterations}"
        )
