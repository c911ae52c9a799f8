"""Kernel test cases: each op's call through :mod:`normlab.kernels.ops` and its independent float64 reference.

A case makes its learnable tensors for a channel count and dtype, calls the op (``impl`` selects the backend) and
computes the same math in float64 from the formulas of the papers; every case returns a tuple of outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from normlab.kernels import ops

Params = dict[str, Tensor]


@dataclass
class Case:
    id: str
    make: Callable[[int, torch.dtype], Params]
    call: Callable[[Tensor, Params, str], tuple[Tensor, ...]]
    ref: Callable[[Tensor, Params], tuple[Tensor, ...]]
    residual: bool = False  # the op takes a second input of the input's shape (the fused residual add)
    kw: dict[str, object] = field(default_factory=dict)


def _affine(c: int, dtype: torch.dtype, weight: bool = True, bias: bool = True) -> Params:
    p: Params = {}
    if weight:
        p["weight"] = (1 + 0.5 * torch.randn(c)).to(dtype)
    if bias:
        p["bias"] = (0.3 * torch.randn(c)).to(dtype)
    return p


def _apply(y: Tensor, p: Params) -> Tensor:
    if "weight" in p:
        y = y * p["weight"]
    if "bias" in p:
        y = y + p["bias"]
    return y


def _ln_ref(x: Tensor, p: Params, eps: float = 1e-5) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return _apply((x - mean) / torch.sqrt(var + eps), p)


def _rms_ref(x: Tensor, p: Params, eps: float, inside: bool, k: int | None = None) -> Tensor:
    ms = (x[..., : k or x.shape[-1]] ** 2).mean(-1, keepdim=True)
    return _apply(x / (torch.sqrt(ms + eps) if inside else torch.sqrt(ms) + eps), p)


def _w(p: Params) -> dict[str, Tensor | None]:
    return {"weight": p.get("weight"), "bias": p.get("bias")}


def _prms_k(c: int) -> int:
    return max(1, math.ceil(0.25 * c))


CASES: list[Case] = [
    Case("layer_norm", lambda c, dt: _affine(c, dt), lambda x, p, impl: (ops.layer_norm(x, x.shape[-1], **_w(p),
                                                                                          impl=impl),),
         lambda x, p: (_ln_ref(x, p),)),
    Case("layer_norm_no_affine", lambda c, dt: {}, lambda x, p, impl: (ops.layer_norm(x, x.shape[-1], impl=impl),),
         lambda x, p: (_ln_ref(x, p),)),
    Case("rms_norm", lambda c, dt: _affine(c, dt, bias=False),
         lambda x, p, impl: (ops.rms_norm(x, x.shape[-1], **_w(p), impl=impl),),
         lambda x, p: (_rms_ref(x, p, 1e-6, True),)),
    Case("rms_norm_outside_bias", lambda c, dt: _affine(c, dt),
         lambda x, p, impl: (ops.rms_norm(x, x.shape[-1], **_w(p), eps_inside=False, impl=impl),),
         lambda x, p: (_rms_ref(x, p, 1e-8, False),)),
    Case("srms_norm", lambda c, dt: {}, lambda x, p, impl: (ops.rms_norm(x, x.shape[-1], impl=impl),),
         lambda x, p: (_rms_ref(x, p, 1e-6, True),)),
    Case("srms_norm_outside", lambda c, dt: {},
         lambda x, p, impl: (ops.rms_norm(x, x.shape[-1], eps_inside=False, impl=impl),),
         lambda x, p: (_rms_ref(x, p, 1e-8, False),)),
    Case("prms_norm", lambda c, dt: _affine(c, dt, bias=False),
         lambda x, p, impl: (ops.rms_norm(x, x.shape[-1], **_w(p), partial=_prms_k(x.shape[-1]), impl=impl),),
         lambda x, p: (_rms_ref(x, p, 1e-6, True, _prms_k(x.shape[-1])),)),
    Case("prms_norm_outside", lambda c, dt: _affine(c, dt, bias=False),
         lambda x, p, impl: (ops.rms_norm(x, x.shape[-1], **_w(p), eps_inside=False, partial=_prms_k(x.shape[-1]),
                                          impl=impl),),
         lambda x, p: (_rms_ref(x, p, 1e-8, False, _prms_k(x.shape[-1])),)),
    Case("crms_norm", lambda c, dt: _affine(c, dt),
         lambda x, p, impl: (ops.crms_norm(x, x.shape[-1], **_w(p), impl=impl),),
         lambda x, p: (_apply(x / torch.sqrt(((x**2).sum(-1, keepdim=True) + x.sum(-1, keepdim=True) ** 2)
                                             / (x.shape[-1] + 1) + 1e-5), p),)),
    Case("scale_norm", lambda c, dt: {"scale": torch.tensor([math.sqrt(c)]).to(dt)},
         lambda x, p, impl: (ops.scale_norm(x, x.shape[-1], p["scale"], impl=impl),),
         lambda x, p: (p["scale"] * x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-5),)),
    Case("dyt", lambda c, dt: {"alpha": torch.tensor([0.8]).to(dt), **_affine(c, dt)},
         lambda x, p, impl: (ops.dyt(x, x.shape[-1], p["alpha"], **_w(p), impl=impl),),
         lambda x, p: (_apply(torch.tanh(p["alpha"] * x), p),)),
    Case("dyt_no_bias", lambda c, dt: {"alpha": torch.tensor([0.5]).to(dt), **_affine(c, dt, bias=False)},
         lambda x, p, impl: (ops.dyt(x, x.shape[-1], p["alpha"], **_w(p), impl=impl),),
         lambda x, p: (_apply(torch.tanh(p["alpha"] * x), p),)),
    Case("add_rms_norm", lambda c, dt: _affine(c, dt, bias=False),
         lambda x, p, impl: ops.add_rms_norm(x, p["residual"], x.shape[-1], **_w(p), impl=impl),
         lambda x, p: (_rms_ref(x + p["residual"], p, 1e-6, True), x + p["residual"]), residual=True),
    Case("add_layer_norm", lambda c, dt: _affine(c, dt),
         lambda x, p, impl: ops.add_layer_norm(x, p["residual"], x.shape[-1], **_w(p), impl=impl),
         lambda x, p: (_ln_ref(x + p["residual"], p), x + p["residual"]), residual=True),
]

CASE_IDS = [c.id for c in CASES]


def by_id(name: str) -> Case:
    return next(c for c in CASES if c.id == name)


def make_inputs(case: Case, x: Tensor, seed: int = 1) -> Params:
    """The case's parameters (and residual) for input ``x``, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    p = case.make(x.shape[-1], x.dtype)
    if case.residual:
        p["residual"] = torch.randn(x.shape).to(x.dtype)
    torch.random.set_rng_state(state)
    return p


def _loss(outs: tuple[Tensor, ...], dtype: torch.dtype, seed: int) -> Tensor:
    """A random linear loss whose output gradients are representable in ``dtype`` (so every backend and the float64
    reference receive the same incoming gradient)."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64)
    for o in outs:
        g = torch.randn(o.shape, generator=gen).to(dtype).double()
        total = total + (o.double() * g).sum()
    return total


def run(case: Case, x: Tensor, p: Params, impl: str, grad: bool = True,
        seed: int = 2) -> tuple[tuple[Tensor, ...], dict[str, Tensor | None]]:
    """Outputs and gradients (of a fixed random linear loss) w.r.t. the input and every tensor in ``p``."""
    xg = x.detach().clone().requires_grad_(grad)
    pg = {k: v.detach().clone().requires_grad_(grad) for k, v in p.items()}
    outs = case.call(xg, pg, impl)
    if not grad:
        return tuple(o.detach() for o in outs), {}
    _loss(outs, x.dtype, seed).backward()
    return tuple(o.detach() for o in outs), {"x": xg.grad, **{k: v.grad for k, v in pg.items()}}


def run_ref(case: Case, x: Tensor, p: Params, seed: int = 2) -> tuple[tuple[Tensor, ...], dict[str, Tensor | None]]:
    """The float64 reference on the upcast inputs, with the same loss."""
    x64 = x.detach().double().requires_grad_(True)
    p64 = {k: v.detach().double().requires_grad_(True) for k, v in p.items()}
    outs = case.ref(x64, p64)
    if case.residual:  # the op rounds h = x + residual to the input dtype before normalising it, as eager code does
        h = (x + p["residual"]).double()
        outs = case.ref(x64, {**p64, "residual": p64["residual"] + (h - (x64 + p64["residual"])).detach()})
    _loss(outs, x.dtype, seed).backward()
    return tuple(o.detach() for o in outs), {"x": x64.grad, **{k: v.grad for k, v in p64.items()}}
