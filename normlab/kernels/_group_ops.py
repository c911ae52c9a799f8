"""GroupNorm (Wu & He, ECCV 2018, https://arxiv.org/abs/1803.08494) and InstanceNorm (Ulyanov, Vedaldi, Lempitsky
2016, https://arxiv.org/abs/1607.08022) on token tensors: the ``normlab::group_norm`` custom op (fused on CPU,
``csrc/group_norms.cpp``) and the :func:`group_norm` / :func:`instance_norm` wrappers that
:mod:`normlab.kernels.ops` exports.

The op takes a ``[B, N, C]`` view (``B`` samples, ``N`` positions, channels last) and returns ``(y, mean, var)``: the
output and the per-(sample, group) statistics (biased variance, compute dtype) over the group's ``C / G`` channels and
all ``N`` positions, which is what :func:`normlab.functional.group_norm` reduces for ``channel_dim=-1``. InstanceNorm
is the op with one group per channel; its wrapper updates the running buffers from ``mean`` and ``var`` as
``torch.nn.functional.instance_norm`` does. ``mean`` and ``var`` carry no gradient. The composite bodies below are the
same math in PyTorch ops (devices without a kernel, the composite scope, machines without a compiler).

Channel-first inputs (``channel_dim=1`` of an ``(N, C, *)`` tensor) run the composite op: there each group is one
contiguous block and torch's own ``group_norm`` kernel already normalises it in one fused pass.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch import Tensor

from normlab.functional._checks import apply_affine, check_channels, compute_dtype
from normlab.functional.group_norm import group_norm as composite_group_norm
from normlab.functional.group_norm import instance_norm as composite_instance_norm
from normlab.kernels._custom_ops import _ext
from normlab.kernels._scope import Impl
from normlab.kernels.ops import _check_param, _kernel_impl

__all__ = ["group_norm", "instance_norm"]


def _gn_ext(x: Tensor, impl: str) -> Any:
    """The C++ extension, or ``None`` for the composite body (no extension, or the Triton module, which has no
    group-norm kernel). Asked by identity, not by attribute, so a stale extension fails loudly."""
    ext = _ext(x, impl)
    return None if ext is None or ext is sys.modules.get("normlab.kernels._triton") else ext


def _grouped(t: Tensor, groups: int) -> Tensor:
    """``[B, N, C]`` as ``[B, N, G, C / G]``."""
    return t.reshape(t.shape[0], t.shape[1], groups, t.shape[2] // groups)


def _per_group(s: Tensor) -> Tensor:
    """``[B, G]`` statistics broadcast against :func:`_grouped` tensors."""
    return s[:, None, :, None]


def _composite_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                       eps: float) -> tuple[Tensor, Tensor, Tensor]:
    xs = _grouped(x.to(compute_dtype(x)), groups)
    mean = xs.mean((1, 3))
    xc = xs - _per_group(mean)
    var = xc.square().mean((1, 3))
    y = (xc * _per_group(torch.rsqrt(var + eps))).reshape(x.shape)
    return apply_affine(y, weight, bias).to(x.dtype), mean, var


def _composite_backward(grad: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, groups: int,
                        eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The closed form in ``csrc/group_norms.cpp``: ``dx = r g' - r Q / M - r^3 P (x - mean) / M``."""
    ct = compute_dtype(x)
    g = grad.to(ct)
    xc = _grouped(x.to(ct), groups) - _per_group(mean.to(ct))
    r = _per_group(torch.rsqrt(var.to(ct) + eps))
    gw = _grouped(g * weight.to(ct) if weight is not None else g, groups)
    m = x.shape[1] * (x.shape[2] // groups)
    q, p = gw.sum((1, 3), keepdim=True), (gw * xc).sum((1, 3), keepdim=True)
    dx = (r * gw - r * q / m - r**3 * p / m * xc).reshape(x.shape)
    dw = (_grouped(g, groups) * xc * r).sum((0, 1)).reshape(-1)
    return dx.to(x.dtype), dw, g.sum((0, 1))


@torch.library.custom_op("normlab::group_norm", mutates_args=())
def group_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                  impl: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)`` of GroupNorm on ``x`` [B, N, C]: statistics per sample and group of ``C / num_groups``
    channels over all ``N`` positions (InstanceNorm: ``num_groups = C``)."""
    ext = _gn_ext(x, impl)
    if ext is not None:
        return tuple(ext.gn_fwd(x, weight, bias, num_groups, eps))  # type: ignore[return-value]
    y, mean, var = _composite_forward(x.contiguous(), weight, bias, num_groups, eps)
    return y.contiguous(), mean.contiguous(), var.contiguous()


@group_norm_op.register_fake
def _(x, weight, bias, num_groups, eps, impl="auto"):  # type: ignore[no-untyped-def]
    ct = compute_dtype(x)
    return x.new_empty(x.shape), x.new_empty((x.shape[0], num_groups), dtype=ct), x.new_empty(
        (x.shape[0], num_groups), dtype=ct)


@torch.library.custom_op("normlab::group_norm_backward", mutates_args=())
def group_norm_backward_op(grad: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                           num_groups: int, eps: float, need_weight: bool, need_bias: bool,
                           impl: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of :func:`group_norm_op` (dweight and dbias in the compute dtype; empty when not
    requested)."""
    ext = _gn_ext(x, impl)
    if ext is not None:
        return tuple(ext.gn_bwd(grad, x, mean, var, weight, num_groups, eps, need_weight,  # type: ignore[return-value]
                                need_bias))
    dx, dw, db = _composite_backward(grad.contiguous(), x.contiguous(), mean, var, weight, num_groups, eps)
    return dx.contiguous(), dw if need_weight else x.new_empty(0), db if need_bias else x.new_empty(0)


@group_norm_backward_op.register_fake
def _(grad, x, mean, var, weight, num_groups, eps, need_weight, need_bias, impl="auto"):  # type: ignore[no-untyped-def]
    ct, c = compute_dtype(x), x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty(c, dtype=ct) if need_weight else x.new_empty(0),
            x.new_empty(c, dtype=ct) if need_bias else x.new_empty(0))


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, weight, bias, num_groups, eps, impl = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, mean, var, weight)
    ctx.num_groups, ctx.eps, ctx.impl = num_groups, eps, impl
    ctx.dtypes = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)


def _cast(g: Tensor, dtype: torch.dtype | None, needed: bool) -> Tensor | None:
    if not needed:
        return None
    return g.to(dtype) if dtype is not None and g.dtype != dtype else g


def _backward(ctx: Any, grad: Tensor, *unused: Any) -> tuple[Tensor | None, ...]:
    x, mean, var, weight = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.normlab.group_norm_backward(grad, x, mean, var, weight, ctx.num_groups, ctx.eps,
                                                       nw and weight is not None, nb, ctx.impl)
    wd, bd = ctx.dtypes
    return dx if nx else None, _cast(dw, wd, nw), _cast(db, bd, nb), None, None, None


group_norm_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------------- wrappers ----


def _token_impl(impl: str, x: Tensor, cd: int, op: str) -> str | None:
    """The custom op's ``impl`` for a non-empty token tensor (channels last) on the CPU, else ``None`` (the composite
    op: on other devices that is torch's native group_norm, and there is no fused kernel to gain)."""
    if impl == "triton":
        raise ValueError(f"{op}: has no Triton kernel; expected impl in ('auto', 'composite', 'cpu'), got 'triton'")
    kimpl = _kernel_impl(impl, x, op)
    if kimpl is None or x.device.type != "cpu" or cd != x.dim() - 1 or x.numel() == 0:
        return None
    return kimpl


def group_norm(
    x: Tensor,
    num_channels: int,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    channel_dim: int = 1,
    *,
    impl: Impl = "auto",
) -> Tensor:
    """GroupNorm; see :func:`normlab.functional.group_norm`. Token tensors (channels last) run the fused kernel;
    channel-first ones run the composite op (torch's fused ``group_norm``)."""
    cd = check_channels(x, num_channels, channel_dim, "group_norm", min_dim=2)
    kimpl = _token_impl(impl, x, cd, "group_norm")
    divides = isinstance(num_groups, int) and not isinstance(num_groups, bool) and num_groups >= 1 and (
        num_channels % num_groups == 0)
    if kimpl is None or not divides:  # the composite op raises torch's error for a bad num_groups
        return composite_group_norm(x, num_channels, num_groups, weight, bias, eps, channel_dim)
    _check_param(weight, "weight", num_channels, "group_norm")
    _check_param(bias, "bias", num_channels, "group_norm")
    y, _, _ = torch.ops.normlab.group_norm(x.reshape(x.shape[0], -1, num_channels), weight, bias, num_groups, eps,
                                           kimpl)
    return y.reshape(x.shape)


def _update_running(buf: Tensor, stat: Tensor, momentum: float) -> None:
    """``torch.nn.functional.instance_norm``'s update: each sample's EMA step with its own statistic, averaged over
    the batch (``= (1 - m) buf + m mean_b(stat)``), computed in the statistics' dtype and rounded once into ``buf``."""
    with torch.no_grad():
        buf.copy_(buf.to(stat.dtype) * (1.0 - momentum) + stat.mean(0) * momentum)


def instance_norm(
    x: Tensor,
    num_features: int,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    channel_dim: int = 1,
    *,
    impl: Impl = "auto",
) -> Tensor:
    """InstanceNorm; see :func:`normlab.functional.instance_norm`. The input statistics of token tensors run the fused
    kernel (GroupNorm with one group per channel) and update the running buffers, when given, as the composite op does
    (unbiased variance); normalising with the running statistics (``use_input_stats=False``) and channel-first inputs
    run the composite op."""
    cd = check_channels(x, num_features, channel_dim, "instance_norm", min_dim=3)
    kimpl = _token_impl(impl, x, cd, "instance_norm")
    spatial = x.numel() // max(x.shape[0] * num_features, 1)
    both_or_neither = (running_mean is None) == (running_var is None)
    if kimpl is None or not use_input_stats or spatial <= 1 or momentum is None or not both_or_neither:
        return composite_instance_norm(x, num_features, running_mean, running_var, weight, bias, use_input_stats,
                                       momentum, eps, channel_dim)
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_param(t, name, num_features, "instance_norm")
    y, mean, var = torch.ops.normlab.group_norm(x.reshape(x.shape[0], spatial, num_features), weight, bias,
                                                num_features, eps, kimpl)
    if running_mean is not None and running_var is not None:
        _update_running(running_mean, mean, momentum)
        _update_running(running_var, var * (spatial / (spatial - 1)), momentum)
    return y.reshape(x.shape)
