"""Functional RMS-family norms: RMSNorm / pRMSNorm, CRMSNorm and ScaleNorm.

* RMSNorm and partial RMSNorm: Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467
* CRMSNorm: Jiang et al. 2023, https://arxiv.org/abs/2305.14858
* SRMSNorm (RMSNorm without affine): Qin et al. 2023, https://arxiv.org/abs/2307.14995
* ScaleNorm: Nguyen & Salazar 2019, https://arxiv.org/abs/1910.05895

See the classes in :mod:`normlab.nn.rms_norm` for definitions and dtype contracts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab.functional._checks import affine_in, apply_affine, check_channels, compute_dtype, from_compute, to_compute

__all__ = ["crms_norm", "partial_size", "rms_norm", "scale_norm"]


def partial_size(num_features: int, p: float, rounding: str = "ceil") -> int:
    """Number of leading channels pRMSNorm estimates the RMS from: ``ceil(p*d)`` (or ``floor``)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"prms_norm: expected p in (0, 1], got p={p}")
    if rounding not in ("ceil", "floor"):
        raise ValueError(f"prms_norm: expected rounding in ('ceil', 'floor'), got {rounding!r}")
    # The tiny offset keeps ceil(0.5 * 4) == 2 despite binary floating point noise.
    k = math.ceil(p * num_features - 1e-9) if rounding == "ceil" else int(p * num_features)
    if k < 1:
        raise ValueError(
            f"prms_norm: p={p} with num_features={num_features} and rounding={rounding!r} selects k={k} channels; "
            "expected at least 1 (the official code divides by zero here)"
        )
    return k


def resolve_eps(eps: float | None, eps_inside: bool) -> float:
    """``eps``, or its default for the placement: ``1e-6`` inside the root (LLaMA, ``torch.nn.RMSNorm``),
    ``1e-8`` outside (the official RMSNorm PyTorch code)."""
    if eps is not None:
        return eps
    return 1e-6 if eps_inside else 1e-8


def rms_norm(
    x: Tensor, num_features: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float | None = None,
    eps_inside: bool = True, channel_dim: int = -1, partial: int | None = None, unit_offset: bool = False,
) -> Tensor:
    """RMSNorm over the channel axis; ``partial=k`` estimates the RMS from the first ``k`` channels (pRMSNorm).

    ``unit_offset=True`` multiplies by ``1 + weight`` instead of ``weight`` (Gemma's parametrisation, whose gain
    is stored as an offset from 1), the sum taken in the compute dtype.

    ``eps_inside=True`` computes ``x / sqrt(mean(x^2) + eps)`` (LLaMA, T5, ``torch.nn.RMSNorm``);
    ``eps_inside=False`` computes ``x / (sqrt(mean(x^2)) + eps)`` (the official RMSNorm PyTorch code).
    ``eps=None`` means ``1e-6`` inside, ``1e-8`` outside, as :class:`normlab.nn.RMSNorm`.
    """
    eps = resolve_eps(eps, eps_inside)
    cd = check_channels(x, num_features, channel_dim, "rms_norm")
    xs = to_compute(x, cd)
    w = affine_in(xs.dtype, weight, None)[0]
    if w is not None and unit_offset:  # Gemma: the gain is stored as an offset from 1, summed in the compute dtype
        w = 1.0 + w
    if eps_inside and partial is None:
        y = F.rms_norm(xs, (num_features,), w, eps)
    else:
        part = xs if partial is None else xs[..., :partial]
        ms = part.square().mean(-1, keepdim=True)
        y = apply_affine(xs * torch.rsqrt(ms + eps) if eps_inside else xs / (ms.sqrt() + eps), w, None)
    return from_compute(apply_affine(y, None, bias), x, cd)


def crms_norm(
    z: Tensor, num_features: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
    channel_dim: int = -1,
) -> Tensor:
    """CRMSNorm of a compressed zero-mean code ``z`` of width ``d-1``: ``z / sqrt((sum z^2 + (sum z)^2)/d + eps)``."""
    cd = check_channels(z, num_features, channel_dim, "crms_norm")
    zs = z.to(compute_dtype(z))
    ms = (zs.square().sum(cd, keepdim=True) + zs.sum(cd, keepdim=True).square()) / (num_features + 1)
    return apply_affine(zs * torch.rsqrt(ms + eps), weight, bias, cd).to(z.dtype)


def scale_norm(x: Tensor, num_features: int, weight: Tensor, eps: float = 1e-5, channel_dim: int = -1) -> Tensor:
    """ScaleNorm: ``g * x / max(||x||_2, eps)`` with one learned scalar ``g`` (``weight``, shape ``(1,)``)."""
    cd = check_channels(x, num_features, channel_dim, "scale_norm")
    ct = compute_dtype(x)
    xs = x.to(ct)
    norm = torch.linalg.vector_norm(xs, dim=cd, keepdim=True).clamp_min(eps)
    return (xs * (weight.to(ct) / norm)).to(x.dtype)
