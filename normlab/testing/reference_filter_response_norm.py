"""Float64 reference of FRN + TLU (https://arxiv.org/abs/1911.09737, Eq. 1-3), written from the paper."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.registry import register_reference
from normlab.testing.reference_evo_norm import channel_affine, cvec

__all__ = ["filter_response_norm"]


@register_reference("filter_response_norm")
def filter_response_norm(m: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    x = x.to(torch.float64)
    positions = x[0, 0].numel() if x.numel() else 1
    nu2 = (x**2).sum(tuple(range(2, x.dim())), keepdim=True) / positions if x.dim() > 2 else x**2
    y = channel_affine(x / torch.sqrt(nu2 + m.eps), m)
    return y if m.tau is None else torch.maximum(y, cvec(m.tau, x.dim()))
