"""Builds the (norm spec, constructor kwargs) cases of the contract suite from the registry alone.

The cases are every registered norm (``list_norms()`` at collection time) and every test-local norm in
``tests/_norms``: each of those is imported inside ``registry.temporary()`` here, and its cases carry that
registration, which the ``_test_local_norm`` fixture in ``tests/conftest.py`` makes active while they run (and only
then, so no other test sees the norm).

A norm with fused kernels (``kernel_op``) has each of its cases twice, once per backend: ``impl="composite"`` (the
functional op, the reference implementation) and ``impl="cpu"`` (the fused C++ kernels), built into the module so the
case runs on that backend whatever scope surrounds the test (ids end in ``@composite`` / ``@cpu``).
"""

from __future__ import annotations

import copy
import functools
import importlib
import pkgutil
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import normlab
import tests._norms
from normlab import registry
from normlab.registry import NormSpec, Registrations

C = 6  # channel count of every contract case: divisible for group norms, > 1/p for prms_norm's default p


@dataclass
class Case:
    spec: NormSpec
    kwargs: dict[str, Any]
    # A test-local norm's registration, active only while its case runs (None: a norm normlab registers).
    registration: Registrations | None = None
    # The backend of a norm with fused kernels (the module's ``impl``); None for norms without them.
    impl: str | None = None

    @property
    def id(self) -> str:
        kw = ",".join(f"{k}={v}" for k, v in sorted(self.kwargs.items()))
        base = f"{self.spec.name}[{kw}]" if kw else self.spec.name
        return f"{base}@{self.impl}" if self.impl else base

    def build(self, **extra: Any) -> nn.Module:
        impl = {"impl": self.impl} if self.impl else {}
        return self.spec.cls(C, **{**self.kwargs, **impl, **extra})

    def uses_mask(self, m: nn.Module) -> bool:
        return self.spec.batch_dependent and getattr(m, "channel_dim", 1) == -1


@functools.cache
def local_norms() -> tuple[tuple[NormSpec, Registrations], ...]:
    """Each norm a module of ``tests/_norms`` registers, with the registration that puts it back in the registry."""
    out = []
    for info in pkgutil.iter_modules(tests._norms.__path__, f"{tests._norms.__name__}."):
        if info.name in sys.modules:
            raise RuntimeError(f"{info.name} was imported before the contract suite scoped its registration")
        with registry.temporary() as registration:
            importlib.import_module(info.name)
        if not registration.norms:
            raise RuntimeError(f"{info.name} registers no norm")
        out += [(spec, registration) for spec in registration.norms]
    return tuple(out)


def _specs() -> list[tuple[NormSpec, Registrations | None]]:
    return [*((s, None) for s in normlab.list_norms()), *local_norms()]


IMPLS_WITH_KERNELS = ("composite", "cpu")


def _impls(spec: NormSpec) -> tuple[str | None, ...]:
    return IMPLS_WITH_KERNELS if getattr(spec.cls, "kernel_op", None) else (None,)


def all_cases() -> list[Case]:
    return [Case(spec, dict(kw), reg, impl) for spec, reg in _specs() for kw in spec.samples for impl in _impls(spec)]


def default_cases() -> list[Case]:
    return [Case(spec, {}, reg, impl) for spec, reg in _specs() for impl in _impls(spec)]


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
