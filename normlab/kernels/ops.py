"""Fused-kernel versions of the token norms, with the signatures and results of :mod:`normlab.functional`.

Each function takes the same arguments as its namesake in :mod:`normlab.functional` (so a module can call
``ops.rms_norm(x, **self.functional_kwargs())``), plus a keyword-only ``impl``:

* ``"auto"`` (default): the innermost :func:`~normlab.kernels.use_impl` scope's choice; outside any scope the
  ``normlab::`` custom op, which runs the fused kernel for the input's device when one is available (C++ on CPU,
  Triton on CUDA) and its composite body otherwise (see :func:`normlab.kernels.backends`);
* ``"composite"``: the :mod:`normlab.functional` op itself (no custom op);
* ``"cpu"``: the custom op, raising unless the input is on CPU and the fused kernels are available;
* ``"triton"``: the custom op with its Triton kernels, raising unless Triton is installed and the input is on a
  CUDA device (or Triton runs its interpreter, which takes CPU tensors).

An explicit ``impl`` wins over the scope (see :mod:`normlab.kernels._scope` for the precedence).

Under ``torch.func`` transforms ``"auto"`` runs the composite op (custom ops with registered autograd do not support
them in torch 2.13).

The kernels normalise the last axis; another ``channel_dim`` is moved there (one copy each way). pRMSNorm and
SRMSNorm are :func:`rms_norm` with ``partial=k`` and with ``weight=None``; RMSNorm / SRMSNorm / pRMSNorm: Zhang &
Sennrich 2019 (https://arxiv.org/abs/1910.07467), CRMSNorm: Jiang et al. 2023 (https://arxiv.org/abs/2305.14858),
ScaleNorm: Nguyen & Salazar 2019 (https://arxiv.org/abs/1910.05895), LayerNorm: Ba et al. 2016
(https://arxiv.org/abs/1607.06450), DyT: Zhu et al. 2025 (https://arxiv.org/abs/2503.10622).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import normlab.kernels._batch_ops  # noqa: F401  (registers the torch.ops.normlab batch-statistic ops)
import normlab.kernels._custom_ops  # noqa: F401  (registers the torch.ops.normlab ops)
import normlab.kernels._power_ops  # noqa: F401  (registers the torch.ops.normlab PowerNorm ops)
from normlab.functional._checks import check_channels, check_float_input
from normlab.functional._dist import check_count, check_rows, check_valid, stats_group
from normlab.functional.batch_norm import batch_norm as composite_batch_norm
from normlab.functional.batch_norm import check_mask, update_running_stats

# The composite ops, imported from their modules: the package namespace is filled from the registry at import,
# which a type checker cannot follow.
from normlab.functional.dyt import dyt as composite_dyt
from normlab.functional.layer_norm import layer_norm as composite_layer_norm
from normlab.functional.power_norm import BackwardDivisor, power_step
from normlab.functional.power_norm import power_norm as composite_power_norm
from normlab.functional.rep_batch_norm import rep_batch_norm as composite_rep_batch_norm
from normlab.functional.rms_norm import crms_norm as composite_crms_norm
from normlab.functional.rms_norm import resolve_eps
from normlab.functional.rms_norm import rms_norm as composite_rms_norm
from normlab.functional.rms_norm import scale_norm as composite_scale_norm
from normlab.functional.unified_norm import unified_norm as composite_unified_norm
from normlab.functional.unified_norm import unified_step
from normlab.kernels._build import cpu_status
from normlab.kernels._scope import IMPLS, Impl, check_impl, resolve_impl

__all__ = ["IMPLS", "Impl", "add_layer_norm", "add_rms_norm", "batch_norm", "crms_norm", "dyt", "group_norm",
           "instance_norm", "layer_norm", "power_norm", "rep_batch_norm", "unified_norm", "rms_norm", "scale_norm"]

def _kernel_impl(impl: str, x: Tensor, op: str) -> str | None:
    """Validate ``impl`` and resolve ``"auto"`` against the scope: the ``impl`` argument of the custom op, or
    ``None`` for the composite functional op."""
    impl = resolve_impl(check_impl(impl, op))
    if impl == "composite":
        return None
    if torch.compiler.is_compiling():
        return impl
    # 2026-12-01, torch 2.13: an op whose autograd comes from torch.library.register_autograd cannot run under
    # torch.func transforms (grad, vmap, jacrev raise "must override the setup_context"), so they get the composite op.
    if torch._C._are_functorch_transforms_active():
        if impl != "auto":
            raise RuntimeError(f"{op}: impl={impl!r} cannot run under torch.func transforms; use impl='auto'")
        return None
    if impl == "cpu":
        if x.device.type != "cpu":
            raise ValueError(f"{op}: impl='cpu' needs an input on the CPU, got an input on {x.device}")
        status = cpu_status()
        if not status.available:
            raise RuntimeError(f"{op}: impl='cpu' was requested but the fused CPU kernels are {status.detail}")
    elif impl == "triton":
        from normlab.kernels._triton import check_triton

        check_triton(x, op)
    return impl


def _check_param(t: Tensor | None, name: str, numel: int, op: str) -> None:
    if t is None:
        return
    check_float_input(t, op, name)
    if t.numel() != numel:
        shape = "a one-element tensor" if numel == 1 else f"{numel} elements"
        raise ValueError(f"{op}: expected {name} with {shape}, got {name} of size {list(t.shape)}")


def _channels_last(x: Tensor, cd: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    if cd == x.dim() - 1:
        return x, lambda y: y
    return x.movedim(cd, -1), lambda y: y.movedim(-1, cd)


def rms_norm(
    x: Tensor,
    num_features: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float | None = None,
    eps_inside: bool = True,
    channel_dim: int = -1,
    partial: int | None = None,
    unit_offset: bool = False,
    *,
    impl: Impl = "auto",
) -> Tensor:
    """RMSNorm / SRMSNorm (``weight=None``) / pRMSNorm (``partial=k``); see :func:`normlab.functional.rms_norm`.

    Gemma's ``unit_offset=True`` (gain ``1 + weight`` summed in the compute dtype) runs the composite op: the fused
    kernels take the gain itself."""
    cd = check_channels(x, num_features, channel_dim, "rms_norm")
    kimpl = None if unit_offset else _kernel_impl(impl, x, "rms_norm")
    if kimpl is None:
        return composite_rms_norm(x, num_features, weight, bias, eps, eps_inside, channel_dim, partial, unit_offset)
    k = num_features if partial is None else partial
    if not 1 <= k <= num_features:
        raise ValueError(f"rms_norm: expected partial in [1, num_features={num_features}], got partial={partial}")
    _check_param(weight, "weight", num_features, "rms_norm")
    _check_param(bias, "bias", num_features, "rms_norm")
    xs, back = _channels_last(x, cd)
    return back(torch.ops.normlab.rms_norm(xs, weight, bias, resolve_eps(eps, eps_inside), eps_inside, k, kimpl))


def crms_norm(
    z: Tensor,
    num_features: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    channel_dim: int = -1,
    *,
    impl: Impl = "auto",
) -> Tensor:
    """CRMSNorm of a zero-mean code of width ``d - 1``; see :func:`normlab.functional.crms_norm`."""
    cd = check_channels(z, num_features, channel_dim, "crms_norm")
    kimpl = _kernel_impl(impl, z, "crms_norm")
    if kimpl is None:
        return composite_crms_norm(z, num_features, weight, bias, eps, channel_dim)
    _check_param(weight, "weight", num_features, "crms_norm")
    _check_param(bias, "bias", num_features, "crms_norm")
    zs, back = _channels_last(z, cd)
    return back(torch.ops.normlab.crms_norm(zs, weight, bias, eps, kimpl))


def scale_norm(
    x: Tensor, num_features: int, weight: Tensor, eps: float = 1e-5, channel_dim: int = -1, *, impl: Impl = "auto"
) -> Tensor:
    """ScaleNorm ``g * x / max(||x||_2, eps)`` with the one-element gain ``weight`` = g; see
    :func:`normlab.functional.scale_norm`."""
    cd = check_channels(x, num_features, channel_dim, "scale_norm")
    kimpl = _kernel_impl(impl, x, "scale_norm")
    if kimpl is None:
        return composite_scale_norm(x, num_features, weight, eps, channel_dim)
    _check_param(weight, "weight", 1, "scale_norm")
    xs, back = _channels_last(x, cd)
    return back(torch.ops.normlab.scale_norm(xs, weight, eps, kimpl))


def layer_norm(
    x: Tensor,
    normalized_shape: int | tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    channel_dim: int = -1,
    *,
    impl: Impl = "auto",
) -> Tensor:
    """LayerNorm over ``normalized_shape`` or the ``channel_dim`` axis; see :func:`normlab.functional.layer_norm`."""
    cd = check_channels(x, normalized_shape, channel_dim, "layer_norm")
    kimpl = _kernel_impl(impl, x, "layer_norm")
    if kimpl is None:
        return composite_layer_norm(x, normalized_shape, weight, bias, eps, channel_dim)
    if isinstance(normalized_shape, tuple):  # trailing dims normalised jointly: one flat row each
        c = math.prod(normalized_shape)
        _check_param(weight, "weight", c, "layer_norm")
        _check_param(bias, "bias", c, "layer_norm")
        flat = x.reshape(*x.shape[: x.dim() - len(normalized_shape)], c)
        w = weight.reshape(c) if weight is not None else None
        b = bias.reshape(c) if bias is not None else None
        return torch.ops.normlab.layer_norm(flat, w, b, eps, kimpl).reshape(x.shape)
    _check_param(weight, "weight", normalized_shape, "layer_norm")
    _check_param(bias, "bias", normalized_shape, "layer_norm")
    xs, back = _channels_last(x, cd)
    return back(torch.ops.normlab.layer_norm(xs, weight, bias, eps, kimpl))


def dyt(
    x: Tensor,
    num_features: int,
    alpha: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    channel_dim: int = -1,
    *,
    impl: Impl = "auto",
) -> Tensor:
    """Dynamic Tanh ``weight * tanh(alpha * x) + bias``; see :func:`normlab.functional.dyt`."""
    cd = check_channels(x, num_features, channel_dim, "dyt")
    kimpl = _kernel_impl(impl, x, "dyt")
    if kimpl is None:
        return composite_dyt(x, num_features, alpha, weight, bias, channel_dim)
    _check_param(alpha, "alpha", 1, "dyt")
    _check_param(weight, "weight", num_features, "dyt")
    _check_param(bias, "bias", num_features, "dyt")
    xs, back = _channels_last(x, cd)
    return back(torch.ops.normlab.dyt(xs, alpha, weight, bias, kimpl))


def _check_residual(x: Tensor, residual: Tensor, op: str) -> None:
    check_float_input(residual, op, "residual")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"{op}: expected residual of the input's size {list(x.shape)} and dtype {x.dtype}, "
            f"got size {list(residual.shape)} and dtype {residual.dtype}"
        )


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    num_features: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float | None = None,
    eps_inside: bool = True,
    *,
    impl: Impl = "auto",
) -> tuple[Tensor, Tensor]:
    """``h = x + residual``; returns ``(rms_norm(h), h)`` in one pass (a Pre-LN block's norm and new residual).

    Channels are the last axis; ``x`` and ``residual`` have one shape and dtype.
    """
    check_channels(x, num_features, -1, "add_rms_norm")
    _check_residual(x, residual, "add_rms_norm")
    kimpl = _kernel_impl(impl, x, "add_rms_norm")
    if kimpl is None:
        h = x + residual
        return composite_rms_norm(h, num_features, weight, bias, eps, eps_inside), h
    _check_param(weight, "weight", num_features, "add_rms_norm")
    _check_param(bias, "bias", num_features, "add_rms_norm")
    y, h = torch.ops.normlab.add_rms_norm(x, residual, weight, bias, resolve_eps(eps, eps_inside), eps_inside,
                                           kimpl)
    return y, h


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    num_features: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    impl: Impl = "auto",
) -> tuple[Tensor, Tensor]:
    """``h = x + residual``; returns ``(layer_norm(h), h)`` in one pass. Channels are the last axis."""
    check_channels(x, num_features, -1, "add_layer_norm")
    _check_residual(x, residual, "add_layer_norm")
    kimpl = _kernel_impl(impl, x, "add_layer_norm")
    if kimpl is None:
        h = x + residual
        return composite_layer_norm(h, num_features, weight, bias, eps), h
    _check_param(weight, "weight", num_features, "add_layer_norm")
    _check_param(bias, "bias", num_features, "add_layer_norm")
    y, h = torch.ops.normlab.add_layer_norm(x, residual, weight, bias, eps, kimpl)
    return y, h


# ----------------------------------------------------------------------------------- batch-statistic norms ----


def _batch_kernel_impl(impl: str, x: Tensor, num_features: int, channel_dim: int, training: bool,
                       running: tuple[Tensor | None, Tensor | None], group_args: tuple[Any, bool],
                       op: str) -> str | None:
    """The custom op's ``impl`` when the fused batch-statistics kernel applies, else ``None`` (the composite op).

    It applies to batch statistics (training, or no running buffers) of token tensors (channels last) that are not
    empty, in one process: under an initialised ``torch.distributed`` with a group to sync over, the statistics need
    an all-reduce between their two passes, which the composite op does."""
    if impl == "triton":
        raise ValueError(f"{op}: has no Triton kernel; expected impl in ('auto', 'composite', 'cpu'), got 'triton'")
    kimpl = _kernel_impl(impl, x, op)
    cd = check_channels(x, num_features, channel_dim, op, min_dim=2)
    batch_stats = training or running[0] is None or running[1] is None
    if kimpl is None or not batch_stats or cd != x.dim() - 1 or x.numel() == 0:
        return None
    if training and stats_group(*group_args) is not None:
        return None
    return kimpl


def _batch_train(x: Tensor, num_features: int, kimpl: str, alpha: Tensor | None, running_mean: Tensor | None,
                 running_var: Tensor | None, weight: Tensor | None, bias: Tensor | None, training: bool,
                 momentum: float | None, eps: float, mask: Tensor | None, num_batches_tracked: Tensor | None,
                 op: str) -> Tensor:
    mask = check_mask(mask, x, x.dim() - 1, op)
    flat = x.reshape(-1, num_features)
    if mask is None:
        check_rows(flat.shape[0], op, list(x.shape))
    _check_param(weight, "weight", num_features, op)
    _check_param(bias, "bias", num_features, op)
    _check_param(alpha, "alpha", 1, op)
    rows_mask = mask.reshape(-1) if mask is not None else None
    y, mean, var, count = torch.ops.normlab.batch_norm_train(flat, rows_mask, weight, bias, alpha, eps, kimpl)
    if mask is not None:
        check_valid(count, op, list(x.shape), mask, None)
    if training and running_mean is not None and running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
    return y.reshape(x.shape)


def batch_norm(
    x: Tensor,
    num_features: int,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    channel_dim: int = 1,
    mask: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    process_group: Any = None,
    sync_stats: bool = True,
    *,
    impl: Impl = "auto",
) -> Tensor:
    """BatchNorm; see :func:`normlab.functional.batch_norm`. The batch statistics of token tensors (with or without a
    padding mask) run the fused kernel; everything else (channel-first inputs, running statistics, synced ranks)
    runs the composite op."""
    kimpl = _batch_kernel_impl(impl, x, num_features, channel_dim, training, (running_mean, running_var),
                               (process_group, sync_stats), "batch_norm")
    if kimpl is None:
        return composite_batch_norm(x, num_features, running_mean, running_var, weight, bias, training, momentum, eps,
                                    channel_dim, mask, num_batches_tracked, process_group, sync_stats)
    return _batch_train(x, num_features, kimpl, None, running_mean, running_var, weight, bias, training, momentum,
                        eps, mask, num_batches_tracked, "batch_norm")


def rep_batch_norm(
    x: Tensor,
    num_features: int,
    alpha: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    channel_dim: int = -1,
    mask: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    process_group: Any = None,
    sync_stats: bool = True,
    *,
    impl: Impl = "auto",
) -> Tensor:
    """RepBN ``batch_norm(x) + alpha * x`` (Guo et al., SLAB, ICML 2024, https://arxiv.org/abs/2405.11582); see
    :func:`normlab.functional.rep_batch_norm`. Fused as :func:`batch_norm`."""
    kimpl = _batch_kernel_impl(impl, x, num_features, channel_dim, training, (running_mean, running_var),
                               (process_group, sync_stats), "rep_batch_norm")
    if kimpl is None:
        return composite_rep_batch_norm(x, num_features, alpha, running_mean, running_var, weight, bias, training,
                                        momentum, eps, channel_dim, mask, num_batches_tracked, process_group,
                                        sync_stats)
    return _batch_train(x, num_features, kimpl, alpha, running_mean, running_var, weight, bias, training, momentum,
                        eps, mask, num_batches_tracked, "rep_batch_norm")


def power_norm(
    x: Tensor,
    num_features: int,
    running_phi: Tensor,
    ema_gz: Tensor,
    iters: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    eps: float = 1e-5,
    alpha_fwd: float = 0.9,
    alpha_bkw: float = 0.9,
    warmup_iters: int = 10000,
    group_num: int | None = 1,
    group_scaling_eps: float = 1e-5,
    backward_divisor: BackwardDivisor = "batch",
    channel_dim: int = -1,
    mask: Tensor | None = None,
    process_group: Any = None,
    sync_stats: bool = True,
    *,
    impl: Impl = "auto",
) -> Tensor:
    """PowerNorm (Shen et al., ICML 2020, https://arxiv.org/abs/2003.07845); see
    :func:`normlab.functional.power_norm`. The training step of a single process runs the fused kernels (statistics,
    output, and the paper's approximate backward); eval mode and synced ranks run the composite op."""
    op = "power_norm"
    if impl == "triton":
        raise ValueError(f"{op}: has no Triton kernel; expected impl in ('auto', 'composite', 'cpu'), got 'triton'")
    kimpl = _kernel_impl(impl, x, op)
    composite = kimpl is None or not training or x.numel() == 0 or stats_group(process_group, sync_stats) is not None
    if composite or channel_dim not in (-1, x.dim() - 1):
        return composite_power_norm(x, num_features, running_phi, ema_gz, iters, weight, bias, training, eps,
                                    alpha_fwd, alpha_bkw, warmup_iters, group_num, group_scaling_eps,
                                    backward_divisor, channel_dim, mask, process_group, sync_stats)
    groups = 0 if group_num is None else group_num
    if groups and num_features % groups:
        raise ValueError(f"group_scaling: expected group_num >= 1 dividing the channel count {num_features}, "
                         f"got {group_num}")
    flat, rows_mask, count = _token_train(x, num_features, channel_dim, mask, weight, bias, op)
    sumsq = torch.ops.normlab.power_norm_stats(flat.detach(), rows_mask, groups, group_scaling_eps, kimpl)
    psi2 = sumsq / count.to(sumsq.dtype).clamp_min(1.0)
    inv_fwd, inv_bwd = power_step(psi2, running_phi, iters, eps, alpha_fwd, warmup_iters, backward_divisor)
    y = torch.ops.normlab.power_norm_apply(flat, inv_fwd, inv_bwd, weight, bias, ema_gz, alpha_bkw,
                                           float(flat.shape[0]), groups, group_scaling_eps, kimpl)
    return y.reshape(x.shape)


def _token_train(x: Tensor, num_features: int, channel_dim: int, mask: Tensor | None, weight: Tensor | None,
                 bias: Tensor | None, op: str) -> tuple[Tensor, Tensor | None, Tensor]:
    """Validate a token-only training step: ``(rows [T, C], row mask [T] or None, valid-row count)``; refuses
    fewer than 2 valid rows as the composite op does."""
    check_channels(x, num_features, channel_dim, op, min_dim=2)
    mask = check_mask(mask, x, x.dim() - 1, op)
    _check_param(weight, "weight", num_features, op)
    _check_param(bias, "bias", num_features, op)
    flat = x.reshape(-1, num_features)
    rows_mask = mask.reshape(-1) if mask is not None else None
    count = rows_mask.sum() if rows_mask is not None else torch.tensor(float(flat.shape[0]))
    check_count(count, op, x, mask, None)
    return flat, rows_mask, count


def unified_norm(
    x: Tensor,
    num_features: int,
    running_var: Tensor,
    buffer_x2: Tensor,
    buffer_gz: Tensor,
    ema_gz: Tensor,
    iters: Tensor,
    skip_counter: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    eps: float = 1e-5,
    momentum: float = 0.9,
    warmup_iters: int = 4000,
    outlier_filtration: bool = False,
    channel_dim: int = -1,
    mask: Tensor | None = None,
    process_group: Any = None,
    sync_stats: bool = True,
    *,
    impl: Impl = "auto",
) -> Tensor:
    """Unified Normalization (Yang et al., ACM MM 2022, https://arxiv.org/abs/2208.01313); see
    :func:`normlab.functional.unified_norm`. The training step of a single process runs the fused kernels; eval mode
    and synced ranks run the composite op."""
    op = "unified_norm"
    if impl == "triton":
        raise ValueError(f"{op}: has no Triton kernel; expected impl in ('auto', 'composite', 'cpu'), got 'triton'")
    kimpl = _kernel_impl(impl, x, op)
    composite = kimpl is None or not training or x.numel() == 0 or stats_group(process_group, sync_stats) is not None
    if composite or channel_dim not in (-1, x.dim() - 1):
        return composite_unified_norm(x, num_features, running_var, buffer_x2, buffer_gz, ema_gz, iters, skip_counter,
                                      weight, bias, training, eps, momentum, warmup_iters, outlier_filtration,
                                      channel_dim, mask, process_group, sync_stats)
    flat, rows_mask, count = _token_train(x, num_features, channel_dim, mask, weight, bias, op)
    sumsq = torch.ops.normlab.power_norm_stats(flat.detach(), rows_mask, 0, 0.0, kimpl)
    x2 = sumsq / count.to(sumsq.dtype).clamp_min(1.0)
    inv_std, r, t, skip = unified_step(x2, running_var, buffer_x2, iters, skip_counter, eps, momentum, warmup_iters,
                                       outlier_filtration)
    y = torch.ops.normlab.unified_norm_apply(flat, inv_std, r, weight, bias, buffer_gz, ema_gz, t, skip, momentum,
                                             warmup_iters, float(flat.shape[0]), kimpl)
    return y.reshape(x.shape)


# GroupNorm / InstanceNorm on token tensors live in their own module (this one's line budget); imported last, since
# that module uses the helpers above.
from normlab.kernels._group_ops import group_norm, instance_norm  # noqa: E402
