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

In eager code on CPU tensors the token ops run the custom op's bodies and autograd formulas without its dispatch
machinery (bitwise the same results; see :mod:`normlab.kernels._custom_ops`); traced code calls the custom op.

Under ``torch.func`` transforms ``"auto"`` runs the composite op (custom ops with registered autograd do not support
them in torch 2.13).

The kernels normalise the last axis; another ``channel_dim`` is moved there (one copy each way). pRMSNorm and
SRMSNorm are :func:`rms_norm` with ``partial=k`` and with ``weight=None``; RMSNorm / SRMSNorm / pRMSNorm: Zhang &
Sennrich 2019 (https://arxiv.org/abs/1910.07467), CRMSNorm: Jiang et al. 2023 (https://arxiv.org/abs/2305.14858),
ScaleNorm: Nguyen & Salazar 2019 (https://arxiv.org/abs/1910.05895), LayerNorm: Ba et al. 2016
(https://arxiv.org/abs/1607.06450), DyT: Zhu et al. 2025 (https://arxiv.org/abs/2503.10622).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import normlab.kernels._batch_ops  # noqa: F401  (registers the torch.ops.normlab batch-statistic ops)
import normlab.kernels._power_ops  # noqa: F401  (registers the torch.ops.normlab PowerNorm ops)
from normlab.functional._checks import check_channels, check_float_input
from normlab.functional._dist import check_count, check_rows, check_valid, stats_group
from normlab.functional.batch_norm import batch_norm as composite_batch_norm
from normlab.functional.batch_norm import check_mask, update_running_stats

# The composite ops, imported from their modules: the package namespace is filled from the registry at import,
# which a type checker cannot follow.
from normlab.functional.dyt import dyt as composite_dyt
from normlab.functional.layer_norm import layer_norm as composite_layer_norm
from normlab.functional.power_norm import power_norm as composite_power_norm
from normlab.functional.power_norm import power_step
from normlab.functional.rep_batch_norm import rep_batch_norm as composite_rep_batch_norm
from normlab.functional.rms_norm import crms_norm as composite_crms_norm
from normlab.functional.rms_norm import resolve_eps
from normlab.functional.rms_norm import rms_norm as composite_rms_norm
from normlab.functional.rms_norm import scale_norm as composite_scale_norm
from normlab.functional.unified_norm import unified_norm as composite_unified_norm
from normlab.functional.unified_norm import unified_step
from normlab.kernels import _custom_ops as token_ops  # the token ops (registers the torch.ops.normlab ones)
from normlab.kernels._build import cpu_status
from normlab.kernels._scope import IMPLS, Impl, check_impl, resolve_impl

__all__ = ["IMPLS", "Impl", "add_layer_norm", "add_rms_norm", "batch_norm", "crms_norm", "dyt", "group_norm",
           "instance_norm", "layer_norm", "power_norm", "rep_batch_norm", "unified_norm", "rms_norm", "scale_norm"]

Args = dict[str, Any]  # a call's arguments by parameter name, defaults filled in

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


def _twin(composite: Callable[..., Tensor], fused: Callable[[Args, str], Tensor | None],
          doc: str) -> Callable[..., Tensor]:
    """``composite`` with the fused kernels: its signature plus a keyword-only ``impl``. ``fused(args, impl)`` runs
    the kernels, or returns ``None`` for the composite op itself.

    The composite op's signature is the one both take (the wrapper's ``__signature__`` shows it with ``impl``), so
    the two cannot drift apart."""
    sig = inspect.signature(composite)
    names = tuple(sig.parameters)
    defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not p.empty}

    def op(*args: Any, impl: Impl = "auto", **kwargs: Any) -> Tensor:
        bound = {**defaults, **dict(zip(names, args)), **kwargs}
        if len(args) > len(names) or len(bound) != len(names) or any(n in kwargs for n in names[: len(args)]):
            sig.bind(*args, **kwargs)  # raises the TypeError a call of the composite op raises
        out = fused(bound, impl)
        return composite(*args, **kwargs) if out is None else out

    impl_param = inspect.Parameter("impl", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation="Impl")
    op.__signature__ = sig.replace(parameters=[*sig.parameters.values(), impl_param])  # type: ignore[attr-defined]
    op.__name__ = op.__qualname__ = composite.__name__
    op.__doc__ = doc
    return op


def _token(composite: Callable[..., Tensor], params: Callable[[Args], dict[str, int]],
           call: Callable[[Tensor, Args, str], Tensor], doc: str, *, features: str = "num_features",
           fusable: Callable[[Args], bool] = lambda a: True) -> Callable[..., Tensor]:
    """A token norm's fused op: check the channels, pick the kernel (none when ``fusable`` is false), check the
    parameter sizes ``params`` (name -> element count), move the channels last and run ``call(rows, args, impl)``."""
    op = composite.__name__
    first = next(iter(inspect.signature(composite).parameters))

    def fused(a: Args, impl: str) -> Tensor | None:
        x, feats = a[first], a[features]
        cd = check_channels(x, feats, a["channel_dim"], op)
        kimpl = _kernel_impl(impl, x, op) if fusable(a) else None
        if kimpl is None:
            return None
        for name, numel in params(a).items():
            _check_param(a[name], name, numel, op)
        xs, back = _channels_last(x, cd if isinstance(feats, int) else x.dim() - 1)
        return back(call(xs, a, kimpl))

    return _twin(composite, fused, doc)


def _affine(a: Args) -> dict[str, int]:
    return {"weight": a["num_features"], "bias": a["num_features"]}


def _rms_params(a: Args) -> dict[str, int]:
    n, partial = a["num_features"], a["partial"]
    if not 1 <= (n if partial is None else partial) <= n:
        raise ValueError(f"rms_norm: expected partial in [1, num_features={n}], got partial={partial}")
    return _affine(a)


def _rms_call(xs: Tensor, a: Args, kimpl: str) -> Tensor:
    k = a["num_features"] if a["partial"] is None else a["partial"]
    eps = resolve_eps(a["eps"], a["eps_inside"])
    return token_ops.rms_norm(xs, a["weight"], a["bias"], eps, a["eps_inside"], k, kimpl)


rms_norm = _token(composite_rms_norm, _rms_params, _rms_call, """RMSNorm / SRMSNorm (``weight=None``) / pRMSNorm
    (``partial=k``); see :func:`normlab.functional.rms_norm`.

    Gemma's ``unit_offset=True`` (gain ``1 + weight`` summed in the compute dtype) runs the composite op: the fused
    kernels take the gain itself.""", fusable=lambda a: not a["unit_offset"])

crms_norm = _token(composite_crms_norm, _affine,
                   lambda zs, a, k: token_ops.crms_norm(zs, a["weight"], a["bias"], a["eps"], k),
                   """CRMSNorm of a zero-mean code of width ``d - 1``; see :func:`normlab.functional.crms_norm`.""")

scale_norm = _token(composite_scale_norm, lambda a: {"weight": 1},
                    lambda xs, a, k: token_ops.scale_norm(xs, a["weight"], a["eps"], k),
                    """ScaleNorm ``g * x / max(||x||_2, eps)`` with the one-element gain ``weight`` = g; see
    :func:`normlab.functional.scale_norm`.""")


def _ln_params(a: Args) -> dict[str, int]:
    shape = a["normalized_shape"]
    c = math.prod(shape) if isinstance(shape, tuple) else shape
    return {"weight": c, "bias": c}


def _ln_call(xs: Tensor, a: Args, kimpl: str) -> Tensor:
    shape, w, b = a["normalized_shape"], a["weight"], a["bias"]
    if not isinstance(shape, tuple):
        return token_ops.layer_norm(xs, w, b, a["eps"], kimpl)
    c = math.prod(shape)  # trailing dims normalised jointly: one flat row each
    flat = xs.reshape(*xs.shape[: xs.dim() - len(shape)], c)
    w, b = (None if w is None else w.reshape(c)), (None if b is None else b.reshape(c))
    return token_ops.layer_norm(flat, w, b, a["eps"], kimpl).reshape(xs.shape)


layer_norm = _token(composite_layer_norm, _ln_params, _ln_call, """LayerNorm over ``normalized_shape`` or the
    ``channel_dim`` axis; see :func:`normlab.functional.layer_norm`.""", features="normalized_shape")

dyt = _token(composite_dyt, lambda a: {"alpha": 1, **_affine(a)},
             lambda xs, a, k: token_ops.dyt(xs, a["alpha"], a["weight"], a["bias"], k),
             """Dynamic Tanh ``weight * tanh(alpha * x) + bias``; see :func:`normlab.functional.dyt`.""")


def _fused_add(op: str, x: Tensor, residual: Tensor, num_features: int, affine: tuple[Tensor | None, Tensor | None],
               impl: str, norm: Callable[[Tensor], Tensor],
               kernel: Callable[[str], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``(norm(h), h)`` for ``h = x + residual``: one pass of ``kernel(impl)``, or the composite ``norm``."""
    check_channels(x, num_features, -1, op)
    check_float_input(residual, op, "residual")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"{op}: expected residual of the input's size {list(x.shape)} and dtype {x.dtype}, "
            f"got size {list(residual.shape)} and dtype {residual.dtype}"
        )
    kimpl = _kernel_impl(impl, x, op)
    if kimpl is None:
        h = x + residual
        return norm(h), h
    _check_param(affine[0], "weight", num_features, op)
    _check_param(affine[1], "bias", num_features, op)
    return kernel(kimpl)


def add_rms_norm(x: Tensor, residual: Tensor, num_features: int, weight: Tensor | None = None,
                 bias: Tensor | None = None, eps: float | None = None, eps_inside: bool = True, *,
                 impl: Impl = "auto") -> tuple[Tensor, Tensor]:
    """``h = x + residual``; returns ``(rms_norm(h), h)`` in one pass (a Pre-LN block's norm and new residual).

    Channels are the last axis; ``x`` and ``residual`` have one shape and dtype.
    """
    return _fused_add("add_rms_norm", x, residual, num_features, (weight, bias), impl,
                      lambda h: composite_rms_norm(h, num_features, weight, bias, eps, eps_inside),
                      lambda k: token_ops.add_rms_norm(x, residual, weight, bias, resolve_eps(eps, eps_inside),
                                                               eps_inside, k))


def add_layer_norm(x: Tensor, residual: Tensor, num_features: int, weight: Tensor | None = None,
                   bias: Tensor | None = None, eps: float = 1e-5, *, impl: Impl = "auto") -> tuple[Tensor, Tensor]:
    """``h = x + residual``; returns ``(layer_norm(h), h)`` in one pass. Channels are the last axis."""
    return _fused_add("add_layer_norm", x, residual, num_features, (weight, bias), impl,
                      lambda h: composite_layer_norm(h, num_features, weight, bias, eps),
                      lambda k: token_ops.add_layer_norm(x, residual, weight, bias, eps, k))


# ----------------------------------------------------------------------------------- batch-statistic norms ----


def _no_triton(impl: str, op: str) -> None:
    if impl == "triton":
        raise ValueError(f"{op}: has no Triton kernel; expected impl in ('auto', 'composite', 'cpu'), got 'triton'")


def _batch_fused(a: Args, impl: str, op: str) -> Tensor | None:
    """The fused batch-statistics kernel's output, or ``None`` for the composite op.

    The kernel applies to batch statistics (training, or no running buffers) of token tensors (channels last) that
    are not empty, in one process: under an initialised ``torch.distributed`` with a group to sync over, the
    statistics need an all-reduce between their two passes, which the composite op does."""
    x, n, training = a["x"], a["num_features"], a["training"]
    _no_triton(impl, op)
    kimpl = _kernel_impl(impl, x, op)
    cd = check_channels(x, n, a["channel_dim"], op, min_dim=2)
    batch_stats = training or a["running_mean"] is None or a["running_var"] is None
    if kimpl is None or not batch_stats or cd != x.dim() - 1 or x.numel() == 0:
        return None
    if training and stats_group(a["process_group"], a["sync_stats"]) is not None:
        return None
    mask = check_mask(a["mask"], x, x.dim() - 1, op)
    flat = x.reshape(-1, n)
    if mask is None:
        check_rows(flat.shape[0], op, list(x.shape))
    _check_param(a["weight"], "weight", n, op)
    _check_param(a["bias"], "bias", n, op)
    _check_param(a.get("alpha"), "alpha", 1, op)
    rows_mask = mask.reshape(-1) if mask is not None else None
    y, mean, var, count = torch.ops.normlab.batch_norm_train(flat, rows_mask, a["weight"], a["bias"], a.get("alpha"),
                                                             a["eps"], kimpl)
    if mask is not None:
        check_valid(count, op, list(x.shape), mask, None)
    running_mean, running_var = a["running_mean"], a["running_var"]
    if training and running_mean is not None and running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, count, a["momentum"], a["num_batches_tracked"])
    return y.reshape(x.shape)


batch_norm = _twin(composite_batch_norm, lambda a, impl: _batch_fused(a, impl, "batch_norm"), """BatchNorm; see
    :func:`normlab.functional.batch_norm`. The batch statistics of token tensors (with or without a padding mask) run
    the fused kernel; everything else (channel-first inputs, running statistics, synced ranks) runs the composite
    op.""")

rep_batch_norm = _twin(composite_rep_batch_norm, lambda a, impl: _batch_fused(a, impl, "rep_batch_norm"), """RepBN
    ``batch_norm(x) + alpha * x`` (Guo et al., SLAB, ICML 2024, https://arxiv.org/abs/2405.11582); see
    :func:`normlab.functional.rep_batch_norm`. Fused as :func:`batch_norm`.""")


def _train_kimpl(a: Args, impl: str, op: str) -> str | None:
    """The custom op's ``impl`` for the training step of a single process on token rows, else ``None``."""
    x = a["x"]
    _no_triton(impl, op)
    kimpl = _kernel_impl(impl, x, op)
    synced = stats_group(a["process_group"], a["sync_stats"]) is not None
    composite = kimpl is None or not a["training"] or x.numel() == 0 or synced
    return None if composite or a["channel_dim"] not in (-1, x.dim() - 1) else kimpl


def _token_stats(a: Args, groups: int, gs_eps: float, kimpl: str, op: str) -> tuple[Tensor, Tensor]:
    """Validate a token-only training step; return its rows ``[T, C]`` and their per-channel quadratic mean over the
    valid rows (of the GroupScaled rows for ``groups > 0``). Refuses fewer than 2 valid rows as the composite op
    does."""
    x, n = a["x"], a["num_features"]
    check_channels(x, n, a["channel_dim"], op, min_dim=2)
    mask = check_mask(a["mask"], x, x.dim() - 1, op)
    _check_param(a["weight"], "weight", n, op)
    _check_param(a["bias"], "bias", n, op)
    flat = x.reshape(-1, n)
    rows_mask = mask.reshape(-1) if mask is not None else None
    count = rows_mask.sum() if rows_mask is not None else torch.tensor(float(flat.shape[0]))
    check_count(count, op, x, mask, None)
    sumsq = torch.ops.normlab.power_norm_stats(flat.detach(), rows_mask, groups, gs_eps, kimpl)
    return flat, sumsq / count.to(sumsq.dtype).clamp_min(1.0)


def _power_fused(a: Args, impl: str) -> Tensor | None:
    kimpl = _train_kimpl(a, impl, "power_norm")
    if kimpl is None:
        return None
    group_num, gs_eps = a["group_num"], a["group_scaling_eps"]
    groups = 0 if group_num is None else group_num
    if groups and a["num_features"] % groups:
        raise ValueError(f"group_scaling: expected group_num >= 1 dividing the channel count {a['num_features']}, "
                         f"got {group_num}")
    flat, psi2 = _token_stats(a, groups, gs_eps, kimpl, "power_norm")
    inv_fwd, inv_bwd = power_step(psi2, a["running_phi"], a["iters"], a["eps"], a["alpha_fwd"], a["warmup_iters"],
                                  a["backward_divisor"])
    y = torch.ops.normlab.power_norm_apply(flat, inv_fwd, inv_bwd, a["weight"], a["bias"], a["ema_gz"],
                                           a["alpha_bkw"], float(flat.shape[0]), groups, gs_eps, kimpl)
    return y.reshape(a["x"].shape)


power_norm = _twin(composite_power_norm, _power_fused, """PowerNorm (Shen et al., ICML 2020,
    https://arxiv.org/abs/2003.07845); see :func:`normlab.functional.power_norm`. The training step of a single
    process runs the fused kernels (statistics, output, and the paper's approximate backward); eval mode and synced
    ranks run the composite op.""")


def _unified_fused(a: Args, impl: str) -> Tensor | None:
    kimpl = _train_kimpl(a, impl, "unified_norm")
    if kimpl is None:
        return None
    flat, x2 = _token_stats(a, 0, 0.0, kimpl, "unified_norm")
    momentum, warmup_iters = a["momentum"], a["warmup_iters"]
    inv_std, r, t, skip = unified_step(x2, a["running_var"], a["buffer_x2"], a["iters"], a["skip_counter"], a["eps"],
                                       momentum, warmup_iters, a["outlier_filtration"])
    y = torch.ops.normlab.unified_norm_apply(flat, inv_std, r, a["weight"], a["bias"], a["buffer_gz"], a["ema_gz"], t,
                                             skip, momentum, warmup_iters, float(flat.shape[0]), kimpl)
    return y.reshape(a["x"].shape)


unified_norm = _twin(composite_unified_norm, _unified_fused, """Unified Normalization (Yang et al., ACM MM 2022,
    https://arxiv.org/abs/2208.01313); see :func:`normlab.functional.unified_norm`. The training step of a single
    process runs the fused kernels; eval mode and synced ranks run the composite op.""")


# GroupNorm / InstanceNorm on token tensors live in their own module (this one's line budget); imported last, since
# that module uses the helpers above.
from normlab.kernels._group_ops import group_norm, instance_norm  # noqa: E402
