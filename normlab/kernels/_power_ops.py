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

from normlab.functional._checks import apply_affine, compute_dtype
from normlab.functional.power_norm import group_scaling
from normlab.kernels._batch_ops import _bn_ext, _or_empty

__all__: list[str] = []


def _scaled(x: Tensor, groups: int, gs_eps: float) -> Tensor:
    xs = x.to(compute_dtype(x))
    return group_scaling(xs, groups, gs_eps) if groups > 0 else xs


def _apply(x: Tensor, inv: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], groups: int, gs_eps: float,
           impl: str) -> Tensor:
    """The forward of both apply ops: ``GroupScaling(x) * inv * weight + bias`` (``groups = 0``: no GroupScaling)."""
    ext = _bn_ext(x, impl)
    if ext is not None:
        return ext.pn_apply(x, inv, weight, bias, groups, gs_eps)
    return apply_affine(_scaled(x, groups, gs_eps) * inv, weight, bias).to(x.dtype).contiguous()


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
    return _apply(x, inv_fwd, weight, bias, groups, gs_eps, impl)


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
    return dx.contiguous(), s, _or_empty(dw, need_weight, x), _or_empty(db, need_bias, x)


@power_norm_apply_backward_op.register_fake
def _(grad, x, inv_fwd, inv_bwd, weight, u, alpha_bkw, groups, gs_eps, need_weight, need_bias, impl="auto"):  # type: ignore[no-untyped-def]
    ct, c = compute_dtype(x), x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty(c, dtype=ct), _or_empty(x.new_empty(c, dtype=ct), need_weight, x),
            _or_empty(x.new_empty(c, dtype=ct), need_bias, x))


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


# --------------------------------------------------------------------------------------------- UnifiedNorm ----
# Unified Normalization (Yang et al., ACM MM 2022, https://arxiv.org/abs/2208.01313): the forward statistic is the
# column quadratic mean (power_norm_stats without GroupScaling), the output x * inv_std * w + b (power_norm_apply's
# kernel); the backward needs the batch's column sums before dx (its gradient smoothing,
# :func:`normlab.functional.unified_norm.unified_grad_step`, runs on [C] tensors between the two passes).


@torch.library.custom_op("normlab::unified_norm_sums", mutates_args=())
def unified_norm_sums_op(grad: Tensor, x: Tensor, impl: str = "auto") -> Tensor:
    """``[sum gy, sum gy * x]`` per channel over all rows (compute dtype, length 2C)."""
    ext = _bn_ext(x, impl)
    if ext is not None:
        return ext.un_sums(grad, x)
    ct = compute_dtype(x)
    g, xs = grad.to(ct), x.to(ct)
    return torch.cat([g.sum(0), (g * xs).sum(0)])


@unified_norm_sums_op.register_fake
def _(grad, x, impl="auto"):  # type: ignore[no-untyped-def]
    return x.new_empty(2 * x.shape[-1], dtype=compute_dtype(x))


@torch.library.custom_op("normlab::unified_norm_dx", mutates_args=())
def unified_norm_dx_op(grad: Tensor, x: Tensor, a: Tensor, b: Tensor, impl: str = "auto") -> Tensor:
    """``grad * a - x * b`` with per-channel ``a``, ``b``, in ``x``'s dtype."""
    ext = _bn_ext(x, impl)
    if ext is not None:
        return ext.un_dx(grad, x, a, b)
    ct = compute_dtype(x)
    return (grad.to(ct) * a - x.to(ct) * b).to(x.dtype).contiguous()


@unified_norm_dx_op.register_fake
def _(grad, x, a, b, impl="auto"):  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape)


@torch.library.custom_op("normlab::unified_norm_apply", mutates_args=())
def unified_norm_apply_op(x: Tensor, inv_std: Tensor, r: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          buffer_gz: Tensor, ema_gz: Tensor, t: int, skip: bool, momentum: float, warmup_iters: int,
                          positions: float, impl: str = "auto") -> Tensor:
    """``x * inv_std * weight + bias``; the other arguments are the state of its smoothed, calibrated backward."""
    return _apply(x, inv_std, weight, bias, 0, 0.0, impl)


@unified_norm_apply_op.register_fake
def _(x, inv_std, r, weight, bias, buffer_gz, ema_gz, t, skip, momentum, warmup_iters, positions, impl="auto"):  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape)


def _un_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, inv_std, r, weight, bias, buffer_gz, ema_gz, t, skip, momentum, warmup_iters, positions, impl = inputs
    ctx.save_for_backward(x, inv_std, r, weight)
    # The gradient windows are read and written when the backward runs (in place, as the official code does).
    ctx.state = {"buffer_gz": buffer_gz, "ema_gz": ema_gz, "t": t, "skip": skip, "momentum": momentum,
                 "warmup_iters": warmup_iters}
    ctx.positions, ctx.impl = positions, impl
    ctx.dtypes = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)


def _un_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    from normlab.functional.unified_norm import unified_grad_step

    x, inv_std, r, weight = ctx.saved_tensors
    c = x.shape[-1]
    sums = torch.ops.normlab.unified_norm_sums(grad, x, ctx.impl)
    sg, sgx = sums[:c], sums[c:]
    wr = r * weight.to(r.dtype) if weight is not None else r
    # g = dy * w * r and z = x * inv_std: sum g z = w r inv_std sum(dy x); the smoothing gives g~ = g - coef z.
    coef = unified_grad_step(wr * inv_std * sgx / max(ctx.positions, 1.0), ctx.state)
    dx = torch.ops.normlab.unified_norm_dx(grad, x, wr * inv_std, coef * inv_std.square(), ctx.impl)
    nx, nw, nb = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    wd, bd = ctx.dtypes
    dw = (r * inv_std * sgx).to(wd) if nw and wd is not None else None
    db = sg.to(bd) if nb and bd is not None else None
    return (dx if nx else None, None, None, dw, db, *([None] * 8))


unified_norm_apply_op.register_autograd(_un_backward, setup_context=_un_setup)
