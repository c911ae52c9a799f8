"""The PowerNorm training ops (Shen et al., "PowerNorm: Rethinking Batch Normalization in Transformers", ICML 2020,
https://arxiv.org/abs/2003.07845), fused on CPU (``csrc/batch_norms.cpp``):

* ``normlab::power_norm_stats(x, mask, groups, gs_eps)``: per-channel sum of squares of the GroupScaling output over
  the valid rows of ``x`` [T, C] (no gradient: the statistic is detached, as in the paper's code);
* ``normlab::power_norm_apply(x, inv_fwd, inv_bwd, weight, bias, ema_gz, alpha_bkw, positions, groups, gs_eps)``:
  ``y = GroupScaling(x) * inv_fwd * weight + bias`` whose backward is the paper's approximate recursion, adding
  ``sum(g~ z) / positions`` to ``ema_gz`` in place, as :func:`normlab.functional.power_norm` does.

``groups = 0`` means no GroupScaling. The composite bodies below are the same math in PyTorch ops.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from normlab.functional._checks import compute_dtype
from normlab.functional.power_norm import group_scaling
from normlab.kernels._batch_ops import _bn_ext

__all__: list[str] = []


def _scaled(x: Tensor, groups: int, gs_eps: float) -> Tensor:
    xs = x.to(compute_dtype(x))
    return group_scaling(xs, groups, gs_eps) if groups > 0 else xs


@torch.library.custom_op("normlab::power_norm_stats", mutates_args=())
def power_norm_stats_op(x: Tensor, mask: Optional[Tensor], groups: int, gs_eps: float, impl: str = "auto") -> Tensor:
    """Per-channel sum of squares of ``GroupScaling(x)`` over the valid rows (compute dtype)."""
    ext = _bn_ext(x, impl)
    if ext is not None:
        return ext.pn_stats(x, mask, groups, gs_eps)
    sq = _scaled(x, groups, gs_eps).square()
    return (sq if mask is None else sq * mask.reshape(-1, 1).to(sq.dtype)).sum(0)


@power_norm_stats_op.register_fake
def _(x, mask, groups, gs_eps, impl="auto"):  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape[-1], dtype=compute_dtype(x))


@torch.library.custom_op("normlab::power_norm_apply", mutates_args=())
def power_norm_apply_op(x: Tensor, inv_fwd: Tensor, inv_bwd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        ema_gz: Tensor, alpha_bkw: float, positions: float, groups: int, gs_eps: float,
                        impl: str = "auto") -> Tensor:
    """``GroupScaling(x) * inv_fwd * weight + bias`` (``inv_bwd``, ``ema_gz``, ``alpha_bkw``, ``positions``: for the
    backward)."""
    ext = _bn_ext(x, impl)
    if ext is not None:
        return ext.pn_apply(x, inv_fwd, weight, bias, groups, gs_eps)
    z = _scaled(x, groups, gs_eps) * inv_fwd
    if weight is not None:
        z = z * weight.to(z.dtype)
    if bias is not None:
        z = z + bias.to(z.dtype)
    return z.to(x.dtype).contiguous()


@power_norm_apply_op.register_fake
def _(x, inv_fwd, inv_bwd, weight, bias, ema_gz, alpha_bkw, positions, groups, gs_eps, impl="auto"):  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape)


def _composite_backward(grad: Tensor, x: Tensor, inv_fwd: Tensor, inv_bwd: Tensor, weight: Tensor | None,
                        u: Tensor, alpha_bkw: float, groups: int, gs_eps: float) -> tuple[Tensor, ...]:
    ct = compute_dtype(x)
    xs, dy = x.to(ct), grad.to(ct)
    z = _scaled(x, groups, gs_eps) * inv_fwd
    g = dy * weight.to(ct) if weight is not None else dy
    gt = g - (1.0 - alpha_bkw) * u.to(ct) * z
    dxs = gt * inv_bwd
    if groups > 0:  # GroupScaling backward: dx = r dxs - r^3 x mean_group(dxs x)
        c = x.shape[-1]
        xg, dg = xs.reshape(-1, groups, c // groups), dxs.reshape(-1, groups, c // groups)
        r = torch.rsqrt(xg.square().mean(-1, keepdim=True) + gs_eps)
        dxs = (dg * r - r**3 * xg * (dg * xg).mean(-1, keepdim=True)).reshape(x.shape)
    return dxs.to(x.dtype), (gt * z).sum(0), (dy * z).sum(0), dy.sum(0)


@torch.library.custom_op("normlab::power_norm_apply_backward", mutates_args=())
def power_norm_apply_backward_op(grad: Tensor, x: Tensor, inv_fwd: Tensor, inv_bwd: Tensor, weight: Optional[Tensor],
                                 u: Tensor, alpha_bkw: float, groups: int, gs_eps: float, need_weight: bool,
                                 need_bias: bool, impl: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, s, dweight, dbias): ``s = sum_all g~ z`` per channel for the ``ema_gz`` update (compute dtype)."""
    ext = _bn_ext(x, impl)
    if ext is not None:
        return tuple(ext.pn_bwd(grad, x, inv_fwd, inv_bwd, weight, u, alpha_bkw, groups, gs_eps,  # type: ignore[return-value]
                                need_weight, need_bias))
    dx, s, dw, db = _composite_backward(grad, x, inv_fwd, inv_bwd, weight, u, alpha_bkw, groups, gs_eps)
    empty = x.new_empty(0)
    return dx.contiguous(), s, dw if need_weight else empty, db if need_bias else empty


@power_norm_apply_backward_op.register_fake
def _(grad, x, inv_fwd, inv_bwd, weight, u, alpha_bkw, groups, gs_eps, need_weight, need_bias, impl="auto"):  # type: ignore[no-untyped-def]
    ct, c = compute_dtype(x), x.shape[-1]
    empty = x.new_empty(0)
    return (x.new_empty(x.shape), x.new_empty(c, dtype=ct), x.new_empty(c, dtype=ct) if need_weight else empty,
            x.new_empty(c, dtype=ct) if need_bias else empty)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, inv_fwd, inv_bwd, weight, bias, ema_gz, alpha_bkw, positions, groups, gs_eps, impl = inputs
    ctx.save_for_backward(x, inv_fwd, inv_bwd, weight)
    # ema_gz is read and updated when the backward runs (not saved: the update is in place, as the paper's code).
    ctx.ema_gz, ctx.alpha_bkw, ctx.positions, ctx.groups, ctx.gs_eps, ctx.impl = (
        ema_gz, alpha_bkw, positions, groups, gs_eps, impl)
    ctx.dtypes = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, inv_fwd, inv_bwd, weight = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    dx, s, dw, db = torch.ops.normlab.power_norm_apply_backward(
        grad, x, inv_fwd, inv_bwd, weight, ctx.ema_gz, ctx.alpha_bkw, ctx.groups, ctx.gs_eps,
        nw and weight is not None, nb, ctx.impl)
    with torch.no_grad():
        ctx.ema_gz.add_((s / max(ctx.positions, 1.0)).to(ctx.ema_gz.dtype))
    wd, bd = ctx.dtypes
    return (dx if nx else None, None, None, dw.to(wd) if nw and wd is not None else None,
            db.to(bd) if nb and bd is not None else None, None, None, None, None, None, None)


power_norm_apply_op.register_autograd(_backward, setup_context=_setup)
