"""The ``normlab::batch_norm_train`` custom op: the batch-statistics forward and backward of BatchNorm on token rows
with a padding mask, and of RepBN (BatchNorm plus ``alpha * x``), fused on CPU (``csrc/batch_norms.cpp``).

The op takes the ``[T, C]`` rows and an optional ``[T]`` mask and returns ``(y, mean, var, count)``: the output and
the per-channel batch statistics (biased variance, in the compute dtype) over the valid rows, which the caller uses
to update the running buffers exactly as the composite op does. ``mean``, ``var`` and ``count`` carry no gradient.
The composite body below is the same math in PyTorch ops (devices without a kernel, the composite scope).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from normlab.functional._checks import compute_dtype
from normlab.functional.batch_norm import masked_moments
from normlab.kernels._custom_ops import _ext

__all__: list[str] = []


def _or_empty(t: Tensor, needed: bool, x: Tensor) -> Tensor:
    """``t``, or a new empty tensor for a gradient that was not requested (a custom op's outputs may not alias each
    other, so never one shared empty tensor)."""
    return t if needed else x.new_empty(0)


def _bn_ext(x: Tensor, impl: str) -> Any:
    ext = _ext(x, impl)
    return ext if ext is not None and hasattr(ext, "bn_fwd") else None  # no Triton batch-statistic kernels


def _composite_forward(x: Tensor, mask: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                       alpha: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xs = x.to(compute_dtype(x))
    count, mean, var = masked_moments(xs, mask)
    y = (xs - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(xs.dtype)
    if bias is not None:
        y = y + bias.to(xs.dtype)
    if alpha is not None:
        y = y + alpha.to(xs.dtype) * xs
    return y.to(x.dtype), mean, var, count.to(xs.dtype).reshape(())


def _composite_backward(grad: Tensor, x: Tensor, mask: Tensor | None, mean: Tensor, var: Tensor,
                        weight: Tensor | None, alpha: Tensor | None, eps: float) -> tuple[Tensor, ...]:
    """The closed form in ``csrc/batch_norms.cpp``: every row's output uses (mean, var); only valid rows feed them."""
    ct = compute_dtype(x)
    xs, g = x.to(ct), grad.to(ct)
    valid = torch.ones(x.shape[0], 1, dtype=ct) if mask is None else mask.reshape(-1, 1).to(ct)
    n = valid.sum().clamp_min(1.0)
    rstd = torch.rsqrt(var.to(ct) + eps)
    xc = xs - mean.to(ct)
    sg, sgx = g.sum(0), (g * xc).sum(0)
    rw = rstd * weight.to(ct) if weight is not None else rstd
    dx = g * rw - valid * (rw * sg / n + rw * rstd.square() * sgx / n * xc)
    if alpha is not None:
        dx = dx + alpha.to(ct) * g
    dalpha = (g * xs).sum().reshape(1) if alpha is not None else xs.new_empty(0)
    return dx.to(x.dtype), sgx * rstd, sg, dalpha


@torch.library.custom_op("normlab::batch_norm_train", mutates_args=())
def batch_norm_train_op(x: Tensor, mask: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                        alpha: Optional[Tensor], eps: float,
                        impl: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, count)`` of BatchNorm (RepBN with ``alpha``) over the valid rows of ``x`` [T, C]."""
    ext = _bn_ext(x, impl)
    if ext is not None:
        return tuple(ext.bn_fwd(x, mask, weight, bias, alpha, eps))  # type: ignore[return-value]
    y, mean, var, count = _composite_forward(x.contiguous(), mask, weight, bias, alpha, eps)
    return y.contiguous(), mean, var, count


@batch_norm_train_op.register_fake
def _(x, mask, weight, bias, alpha, eps, impl="auto"):  # type: ignore[no-untyped-def]
    ct = compute_dtype(x)
    c = x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(c, dtype=ct), x.new_empty(c, dtype=ct), x.new_empty((), dtype=ct)


@torch.library.custom_op("normlab::batch_norm_train_backward", mutates_args=())
def batch_norm_train_backward_op(
    grad: Tensor, x: Tensor, mask: Optional[Tensor], mean: Tensor, var: Tensor, weight: Optional[Tensor],
    alpha: Optional[Tensor], eps: float, need_weight: bool, need_bias: bool, need_alpha: bool, impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dalpha) of :func:`batch_norm_train_op` (dweight and dbias in the compute dtype)."""
    ext = _bn_ext(x, impl)
    if ext is not None:
        return tuple(ext.bn_bwd(grad, x, mask, mean, var, weight, alpha, eps, need_weight, need_bias,  # type: ignore[return-value]
                                need_alpha))
    dx, dw, db, da = _composite_backward(grad.contiguous(), x.contiguous(), mask, mean, var, weight, alpha, eps)
    return dx.contiguous(), _or_empty(dw, need_weight, x), _or_empty(db, need_bias, x), _or_empty(da, need_alpha, x)


@batch_norm_train_backward_op.register_fake
def _(grad, x, mask, mean, var, weight, alpha, eps, need_weight, need_bias, need_alpha, impl="auto"):  # type: ignore[no-untyped-def]
    ct, c = compute_dtype(x), x.shape[-1]
    return (x.new_empty(x.shape), _or_empty(x.new_empty(c, dtype=ct), need_weight, x),
            _or_empty(x.new_empty(c, dtype=ct), need_bias, x), _or_empty(x.new_empty(1, dtype=ct), need_alpha, x))


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, mask, weight, bias, alpha, eps, impl = inputs
    _, mean, var, count = output
    ctx.mark_non_differentiable(mean, var, count)
    ctx.save_for_backward(x, mask, mean, var, weight, alpha)
    ctx.eps, ctx.impl = eps, impl
    ctx.dtypes = tuple(t.dtype if t is not None else None for t in (weight, bias, alpha))


def _cast(g: Tensor, dtype: torch.dtype | None, needed: bool) -> Tensor | None:
    if not needed:
        return None
    return g.to(dtype) if dtype is not None and g.dtype != dtype else g


def _backward(ctx: Any, grad: Tensor, *unused: Any) -> tuple[Tensor | None, ...]:
    x, mask, mean, var, weight, alpha = ctx.saved_tensors
    nx, _, nw, nb, na = ctx.needs_input_grad[:5]
    dx, dw, db, da = torch.ops.normlab.batch_norm_train_backward(
        grad, x, mask, mean, var, weight, alpha, ctx.eps, nw and weight is not None, nb, na and alpha is not None,
        ctx.impl)
    wd, bd, ad = ctx.dtypes
    dalpha = _cast(da, ad, na)
    if dalpha is not None:
        dalpha = dalpha.reshape(alpha.shape)
    return (dx if nx else None, None, _cast(dw, wd, nw), _cast(db, bd, nb), dalpha, None, None)


batch_norm_train_op.register_autograd(_backward, setup_context=_setup)
