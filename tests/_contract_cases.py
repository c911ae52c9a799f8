"""Builds the (norm spec, constructor kwargs) cases of the contract suite from the registry alone."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import normlab
from normlab.registry import NormSpec

C = 6  # channel count of every contract case: divisible for group norms, > 1/p for prms_norm's default p


@dataclass
class Case:
    spec: NormSpec
    kwargs: dict[str, Any]

    @property
    def id(self) -> str:
        kw = ",".join(f"{k}={v}" for k, v in sorted(self.kwargs.items()))
        return f"{self.spec.name}[{kw}]" if kw else self.spec.name

    def build(self, **extra: Any) -> nn.Module:
        return self.spec.cls(C, **{**self.kwargs, **extra})

    def uses_mask(self, m: nn.Module) -> bool:
        return self.spec.batch_dependent and getattr(m, "channel_dim", 1) == -1


def all_cases() -> list[Case]:
    return [Case(spec, dict(kw)) for spec in normlab.list_norms() for kw in spec.samples]


def default_cases() -> list[Case]:
    return [Case(spec, {}) for spec in normlab.list_norms()]


def input_shape(m: nn.Module) -> tuple[int, ...]:
    """(B, N, C) tokens for channel_dim=-1, (N, C, H, W) otherwise."""
    cd = getattr(m, "channel_dim", -1)
    if cd == -1:
        return (3, 5, C)
    if cd == 1:
        return (3, C, 4, 3)
    raise AssertionError(f"contract cases cover channel_dim -1 and 1, got {cd}")


def make_input(m: nn.Module, dtype: torch.dtype = torch.float32, *, scale: float = 1.5) -> Tensor:
    shape = input_shape(m)
    # A per-channel offset makes mean subtraction matter; a heavy row tests the statistics.
    offset = torch.linspace(-1.0, 1.0, C, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64) * scale
    cd = getattr(m, "channel_dim", -1)
    bshape = [1] * len(shape)
    bshape[cd] = C
    return (x + offset.reshape(bshape)).to(dtype)


def make_mask(m: nn.Module) -> Tensor:
    b, n = input_shape(m)[:2]
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    return mask


@torch.no_grad()
def randomize(m: nn.Module, seed: int = 1) -> nn.Module:
    """Move parameters and running statistics away from their identity-like initial values, deterministically."""
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        if p.device.type == "meta":
            continue
        p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    for name, b in m.named_buffers():
        if not b.is_floating_point() or b.device.type == "meta":
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("running") and ("var" in leaf or "phi" in leaf):
            b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64).to(b.dtype) * 1.5 + 0.5)
        elif leaf.startswith("running") and "mean" in leaf:
            b.copy_(0.3 * torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
    return m


def float_buffers(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.named_buffers() if v.is_floating_point()}


def clone(m: nn.Module) -> nn.Module:
    return copy.deepcopy(m)


def call(m: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    return m(x) if mask is None else m(x, mask=mask)
