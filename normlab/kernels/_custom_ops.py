"""The ``normlab::`` custom ops: schemas, fake (meta) implementations and autograd.

Each forward op and each backward op is a :func:`torch.library.custom_op`, so ``torch.compile(fullgraph=True)`` and
``torch.export`` see one opaque node per norm (the fake implementations give shapes and dtypes) and autograd calls
the backward op. All ops normalise the **last** axis; :mod:`normlab.kernels.ops` moves a channel axis there.

Every op takes a trailing ``impl`` (``"auto"``, ``"cpu"`` or ``"triton"``; :mod:`normlab.kernels.ops` resolves
``"composite"`` before calling an op). ``"auto"`` is decided when the op runs: the innermost
:func:`~normlab.kernels.use_impl` scope (how a compiled graph honours the scope), then the fused kernels of the input's
device: C++ on CPU when they are available (see :mod:`normlab.kernels._build`), Triton on CUDA when it is installed
(see :mod:`normlab.kernels._triton`); anywhere else the composite bodies of :mod:`normlab.kernels._composite`. The
forward op's ``impl`` is saved for the backward op, so both run the same backend.
The backward ops recompute the per-row statistics from ``x`` (cheap: the row is in cache) instead of saving them,
so every forward op has one output per result. Double backward is not supported through these ops.

In eager code the token ops skip the custom-op machinery (its Python dispatch costs more than the kernels at small
shapes): :mod:`normlab.kernels.ops` calls :class:`_EagerOp`, which runs the same bodies, ``setup_context`` and
backward in a plain :class:`torch.autograd.Function` (bitwise the same results); while tracing (``torch.compile``,
``torch.export``), under ``torch.func`` and for non-CPU, fake or subclass tensors it calls the custom op.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor

from normlab.functional._checks import compute_dtype
from normlab.kernels import _composite as comp
from normlab.kernels._build import cpu_extension, cpu_status
from normlab.kernels._scope import current_impl

__all__: list[str] = []

_LN = -1  # add_norm_forward's mode for LayerNorm


def _ext(x: Tensor, impl: str) -> ModuleType | None:
    """The kernel module an op body calls (the C++ extension or :mod:`normlab.kernels._triton`, which define the same
    functions), or ``None`` for the composite body."""
    if impl == "auto":
        impl = current_impl()
    if impl == "auto":
        if x.device.type == "cpu":
            return cpu_extension()
        if x.device.type == "cuda":
            from normlab.kernels import _triton

            return _triton if _triton.available() and _triton.supports(x) else None
        return None
    if impl == "cpu":
        if x.device.type != "cpu" or not cpu_status().available:
            raise RuntimeError(f"normlab kernels: impl='cpu' needs a CPU input and the CPU kernels, got an input on "
                               f"{x.device} with the kernels {cpu_status().detail}")
        return cpu_extension()
    if impl == "triton":
        from normlab.kernels import _triton

        _triton.check_triton(x, "normlab kernels")
        return _triton if _triton.supports(x) else None
    return None


def _forward(x: Tensor, impl: str, kernel: str, composite: Callable[..., Tensor], *args: Any) -> Tensor:
    """A forward op's body: the kernel module's ``kernel(x, *args)``, or the composite body of a contiguous ``x``."""
    ext = _ext(x, impl)
    if ext is not None:
        return getattr(ext, kernel)(x, *args)
    return composite(x.contiguous(), *args).contiguous()


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _grad_or_empty(g: Tensor | None, x: Tensor) -> Tensor:
    return g if g is not None else _empty(x)


def _call_backward(ctx: Any, op: str, body: Callable[..., Any], *args: Any) -> Any:
    """A backward op's result: in the eager fast path's first-order backward (see :class:`_EagerOp`) its body itself,
    else the ``normlab::`` backward op ``op`` (so a graph records it, and double backward is refused by the op as
    before)."""
    if getattr(ctx, "eager", False) and not torch.is_grad_enabled():
        return body(*args)
    return getattr(torch.ops.normlab, op)(*args)


def _like(t: Tensor) -> Tensor:
    """A new contiguous tensor shaped like ``t`` (the kernels' outputs are contiguous whatever the input strides)."""
    return t.new_empty(t.shape)


# ----------------------------------------------------------------------------------------------- rms family ----


def _rms_family(x: Tensor, weight: Tensor | None, bias: Tensor | None, scale: Tensor | None, eps: float, mode: int,
                k: int, impl: str) -> Tensor:
    return _forward(x, impl, "rms_fwd", comp.rms_family_forward, weight, bias, scale, eps, mode, k)


def _rms_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, eps_inside: bool,
                  k: int, impl: str = "auto") -> Tensor:
    """RMSNorm of the last axis; the statistic uses the first ``k`` channels (``k = C``: all; pRMSNorm: fewer)."""
    return _rms_family(x, weight, bias, None, eps, comp.INSIDE if eps_inside else comp.OUTSIDE, k, impl)


rms_norm_op = torch.library.custom_op("normlab::rms_norm", _rms_norm_fwd, mutates_args=())


def _crms_norm_fwd(z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   impl: str = "auto") -> Tensor:
    """CRMSNorm of a zero-mean code stored in ``d - 1`` coordinates (the last axis)."""
    return _rms_family(z, weight, bias, None, eps, comp.CRMS, z.shape[-1], impl)


crms_norm_op = torch.library.custom_op("normlab::crms_norm", _crms_norm_fwd, mutates_args=())


def _scale_norm_fwd(x: Tensor, scale: Tensor, eps: float, impl: str = "auto") -> Tensor:
    """ScaleNorm ``g * x / max(||x||, eps)`` over the last axis."""
    return _rms_family(x, None, None, scale, eps, comp.SCALE, x.shape[-1], impl)


scale_norm_op = torch.library.custom_op("normlab::scale_norm", _scale_norm_fwd, mutates_args=())


def _rms_family_bwd(
    grad: Tensor, x: Tensor, weight: Optional[Tensor], scale: Optional[Tensor], grad_add: Optional[Tensor],
    eps: float, mode: int, k: int, need_weight: bool, need_bias: bool, need_scale: bool, impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dscale) of the rms family; unrequested gradients are empty tensors."""
    ext = _ext(x, impl)
    if ext is None:
        dx, dw, db, ds = comp.rms_family_backward(
            grad.contiguous(), x.contiguous(), weight, scale, grad_add, eps, mode, k, (need_weight, need_bias,
                                                                                        need_scale))
        return dx.contiguous(), _grad_or_empty(dw, x), _grad_or_empty(db, x), _grad_or_empty(ds, x)
    dx, dw, db, ds = ext.rms_bwd(grad, x, weight, scale, grad_add, eps, mode, k, need_weight, need_bias, need_scale)
    if need_weight and weight is not None:
        dw = dw.to(weight.dtype)
    if need_scale and scale is not None:
        ds = ds.to(scale.dtype).reshape(scale.shape)
    return dx, dw, db, ds


rms_family_backward_op = torch.library.custom_op("normlab::rms_family_backward", _rms_family_bwd, mutates_args=())


@rms_family_backward_op.register_fake
def _(grad, x, weight, scale, grad_add, eps, mode, k, need_weight, need_bias, need_scale, impl="auto"):  # type: ignore[no-untyped-def]
    c = x.shape[-1]
    dw = _like(weight) if need_weight and weight is not None else _empty(x)
    db = x.new_empty(c, dtype=compute_dtype(x)) if need_bias else _empty(x)
    ds = _like(scale) if need_scale and scale is not None else _empty(x)
    return _like(x), dw, db, ds


def _fake_norm(x: Tensor, *args: Any) -> Tensor:
    return _like(x)


for _op in (rms_norm_op, crms_norm_op, scale_norm_op):
    _op.register_fake(_fake_norm)


def _backward_rms(ctx: Any, grad: Tensor, weight: Tensor | None, scale: Tensor | None, grad_add: Tensor | None,
                  needs: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    (x,) = ctx.saved_tensors[:1]
    return _call_backward(ctx, "rms_family_backward", _rms_family_bwd, grad, x, weight, scale, grad_add, ctx.eps,
                          ctx.mode, ctx.k, *needs, ctx.impl)


def _to_dtype(g: Tensor, dtype: torch.dtype | None) -> Tensor:
    return g.to(dtype) if dtype is not None and g.dtype != dtype else g


def _setup_affine(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, mode: int,
                  k: int, impl: str) -> None:
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.mode, ctx.k, ctx.impl = eps, mode, k, impl
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _rms_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, bias, eps, eps_inside, k, impl = inputs
    _setup_affine(ctx, x, weight, bias, eps, comp.INSIDE if eps_inside else comp.OUTSIDE, k, impl)


def _crms_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    z, weight, bias, eps, impl = inputs
    _setup_affine(ctx, z, weight, bias, eps, comp.CRMS, z.shape[-1], impl)


def _affine_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    weight = ctx.saved_tensors[1]
    nx, nw, nb = ctx.needs_input_grad[:3]
    dx, dw, db, _ = _backward_rms(ctx, grad, weight, None, None, (nw and weight is not None, nb, False))
    return (dx if nx else None), (dw if nw else None), (_to_dtype(db, ctx.bias_dtype) if nb else None)


def _rms_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    return (*_affine_backward(ctx, grad), None, None, None, None)


def _crms_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    return (*_affine_backward(ctx, grad), None, None)


def _scale_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, scale, eps, impl = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps, ctx.mode, ctx.k, ctx.impl = eps, comp.SCALE, x.shape[-1], impl


def _scale_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    scale = ctx.saved_tensors[1]
    nx, ns = ctx.needs_input_grad[:2]
    dx, _, _, ds = _backward_rms(ctx, grad, None, scale, None, (False, False, ns))
    return (dx if nx else None), (ds if ns else None), None, None


rms_norm_op.register_autograd(_rms_backward, setup_context=_rms_setup)
crms_norm_op.register_autograd(_crms_backward, setup_context=_crms_setup)
scale_norm_op.register_autograd(_scale_backward, setup_context=_scale_setup)


# ----------------------------------------------------------------------------------------------- layer norm ----


def _layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    impl: str = "auto") -> Tensor:
    """LayerNorm of the last axis (biased variance, eps inside the root)."""
    return _forward(x, impl, "ln_fwd", comp.layer_norm_forward, weight, bias, eps)


layer_norm_op = torch.library.custom_op("normlab::layer_norm", _layer_norm_fwd, mutates_args=())


def _layer_norm_bwd(grad: Tensor, x: Tensor, weight: Optional[Tensor], grad_add: Optional[Tensor],
                    eps: float, need_weight: bool, need_bias: bool,
                    impl: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of LayerNorm; unrequested gradients are empty tensors."""
    ext = _ext(x, impl)
    if ext is None:
        dx, dw, db = comp.layer_norm_backward(grad.contiguous(), x.contiguous(), weight, grad_add, eps,
                                              (need_weight, need_bias))
        return dx.contiguous(), _grad_or_empty(dw, x), _grad_or_empty(db, x)
    dx, dw, db = ext.ln_bwd(grad, x, weight, grad_add, eps, need_weight, need_bias)
    if need_weight and weight is not None:
        dw = dw.to(weight.dtype)
    return dx, dw, db


layer_norm_backward_op = torch.library.custom_op("normlab::layer_norm_backward", _layer_norm_bwd, mutates_args=())


@layer_norm_backward_op.register_fake
def _(grad, x, weight, grad_add, eps, need_weight, need_bias, impl="auto"):  # type: ignore[no-untyped-def]
    dw = _like(weight) if need_weight and weight is not None else _empty(x)
    db = x.new_empty(x.shape[-1], dtype=compute_dtype(x)) if need_bias else _empty(x)
    return _like(x), dw, db


layer_norm_op.register_fake(_fake_norm)


def _ln_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, bias, eps, impl = inputs
    _setup_affine(ctx, x, weight, bias, eps, _LN, x.shape[-1], impl)


def _ln_grads(ctx: Any, grad: Tensor, grad_add: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    x, weight = ctx.saved_tensors
    nw, nb = ctx.needs_input_grad[ctx.param_at], ctx.needs_input_grad[ctx.param_at + 1]
    if ctx.mode == _LN:
        dx, dw, db = _call_backward(ctx, "layer_norm_backward", _layer_norm_bwd, grad, x, weight, grad_add, ctx.eps,
                                    nw and weight is not None, nb, ctx.impl)
    else:
        dx, dw, db, _ = _call_backward(ctx, "rms_family_backward", _rms_family_bwd, grad, x, weight, None, grad_add,
                                       ctx.eps, ctx.mode, ctx.k, nw and weight is not None, nb, False, ctx.impl)
    return dx, (dw if nw else None), (_to_dtype(db, ctx.bias_dtype) if nb else None)


def _ln_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    ctx.param_at = 1
    dx, dw, db = _ln_grads(ctx, grad, None)
    return (dx if ctx.needs_input_grad[0] else None), dw, db, None, None


layer_norm_op.register_autograd(_ln_backward, setup_context=_ln_setup)


# ------------------------------------------------------------------------------------- fused residual add + norm ----


def _add_norm(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
              mode: int, impl: str) -> tuple[Tensor, Tensor]:
    ext = _ext(x, impl)
    if ext is not None:
        return ext.add_norm_fwd(x, residual, weight, bias, eps, mode)
    y, h = comp.add_norm_forward(x.contiguous(), residual.contiguous(), weight, bias, eps, mode)
    return y.contiguous(), h.contiguous()


def _add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    eps_inside: bool, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """``h = x + residual``; returns ``(rms_norm(h), h)``: the Pre-LN block's norm and its new residual stream."""
    return _add_norm(x, residual, weight, bias, eps, comp.INSIDE if eps_inside else comp.OUTSIDE, impl)


add_rms_norm_op = torch.library.custom_op("normlab::add_rms_norm", _add_rms_norm_fwd, mutates_args=())


def _add_layer_norm_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      eps: float, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """``h = x + residual``; returns ``(layer_norm(h), h)``."""
    return _add_norm(x, residual, weight, bias, eps, _LN, impl)


add_layer_norm_op = torch.library.custom_op("normlab::add_layer_norm", _add_layer_norm_fwd, mutates_args=())


def _fake_add_norm(x: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    return _like(x), _like(x)


add_rms_norm_op.register_fake(_fake_add_norm)
add_layer_norm_op.register_fake(_fake_add_norm)


def _add_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, residual, weight, bias, eps = inputs[:5]
    mode = _LN if len(inputs) == 6 else (comp.INSIDE if inputs[5] else comp.OUTSIDE)
    _setup_affine(ctx, output[1], weight, bias, eps, mode, x.shape[-1], inputs[-1])  # the backward needs h, not x
    ctx.residual_dtype = residual.dtype


def _add_backward(ctx: Any, grad: Tensor, grad_h: Tensor) -> tuple[Tensor | None, ...]:
    ctx.param_at = 2
    dh, dw, db = _ln_grads(ctx, grad, grad_h)
    nx, nr = ctx.needs_input_grad[:2]
    return ((dh if nx else None), (_to_dtype(dh, ctx.residual_dtype) if nr else None), dw, db, None,
            *((None,) if ctx.mode != _LN else ()), None)


add_rms_norm_op.register_autograd(_add_backward, setup_context=_add_setup)
add_layer_norm_op.register_autograd(_add_backward, setup_context=_add_setup)


# ------------------------------------------------------------------------------------------------------- dyt ----


def _dyt_fwd(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
           impl: str = "auto") -> Tensor:
    """Dynamic Tanh ``weight * tanh(alpha * x) + bias`` with a one-element ``alpha``; per-channel on the last axis."""
    return _forward(x, impl, "dyt_fwd", comp.dyt_forward, alpha, weight, bias)


dyt_op = torch.library.custom_op("normlab::dyt", _dyt_fwd, mutates_args=())


def _dyt_bwd(grad: Tensor, x: Tensor, alpha: Tensor, weight: Optional[Tensor], need_alpha: bool,
                    need_weight: bool, need_bias: bool, impl: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dalpha, dweight, dbias) of DyT; unrequested gradients are empty tensors."""
    ext = _ext(x, impl)
    if ext is None:
        dx, da, dw, db = comp.dyt_backward(grad.contiguous(), x.contiguous(), alpha, weight,
                                           (need_alpha, need_weight, need_bias))
        return dx.contiguous(), _grad_or_empty(da, x), _grad_or_empty(dw, x), _grad_or_empty(db, x)
    dx, da, dw, db = ext.dyt_bwd(grad, x, alpha, weight, need_alpha, need_weight, need_bias)
    if need_alpha:
        da = da.to(alpha.dtype).reshape(alpha.shape)
    if need_weight and weight is not None:
        dw = dw.to(weight.dtype)
    return dx, da, dw, db


dyt_backward_op = torch.library.custom_op("normlab::dyt_backward", _dyt_bwd, mutates_args=())


@dyt_backward_op.register_fake
def _(grad, x, alpha, weight, need_alpha, need_weight, need_bias, impl="auto"):  # type: ignore[no-untyped-def]
    da = _like(alpha) if need_alpha else _empty(x)
    dw = _like(weight) if need_weight and weight is not None else _empty(x)
    db = x.new_empty(x.shape[-1], dtype=compute_dtype(x)) if need_bias else _empty(x)
    return _like(x), da, dw, db


dyt_op.register_fake(_fake_norm)


def _dyt_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, alpha, weight, bias, impl = inputs
    ctx.save_for_backward(x, alpha, weight)
    ctx.impl = impl
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _dyt_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, alpha, weight = ctx.saved_tensors
    nx, na, nw, nb = ctx.needs_input_grad[:4]
    dx, da, dw, db = _call_backward(ctx, "dyt_backward", _dyt_bwd, grad, x, alpha, weight, na,
                                    nw and weight is not None, nb, ctx.impl)
    return ((dx if nx else None), (da if na else None), (dw if nw else None),
            (_to_dtype(db, ctx.bias_dtype) if nb else None), None)


dyt_op.register_autograd(_dyt_backward, setup_context=_dyt_setup)


# --------------------------------------------------------------------------------------------- eager fast path ----

_PLAIN = (Tensor, torch.nn.Parameter)


def _eager(args: tuple[Any, ...]) -> bool:
    """Whether a call can skip the custom-op machinery: nothing traces it (``torch.compile``, ``torch.export``,
    ``torch.jit.trace``, ``make_fx``), no ``torch.func`` transform or tensor mode is active, and its tensors are plain
    CPU tensors (no fake, meta or subclass tensors)."""
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._get_tracing_state() is not None):
        return False
    return all(type(a) in _PLAIN and a.device.type == "cpu" for a in args if isinstance(a, Tensor))


class _EagerOp:
    """A token op as :mod:`normlab.kernels.ops` calls it: in eager code a plain :class:`torch.autograd.Function`
    built from the op's own body, ``setup_context`` and backward (whose backward calls the backward op's body, see
    :func:`_call_backward`), so the results are bitwise the op's without its per-call dispatch cost; anywhere else the
    ``normlab::`` custom op itself. All of the op's arguments are passed (the autograd functions count them)."""

    def __init__(self, name: str, body: Callable[..., Any], setup: Callable[..., None],
                 backward: Callable[..., Any]) -> None:
        def forward(ctx: Any, *inputs: Any) -> Any:
            # ctx-style forward: a separate setup_context would make apply() bind the arguments with inspect
            output = body(*inputs)
            setup(ctx, inputs, output)
            ctx.eager = True
            return output

        self.op = getattr(torch.ops.normlab, name)
        self.body = body
        self.function: type[torch.autograd.Function] = type(
            f"EagerFor_normlab_{name}", (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args: Any) -> Any:
        if not _eager(args):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return self.function.apply(*args)
        return self.body(*args)  # no graph to record: the op's autograd would not run either


rms_norm = _EagerOp("rms_norm", _rms_norm_fwd, _rms_setup, _rms_backward)
crms_norm = _EagerOp("crms_norm", _crms_norm_fwd, _crms_setup, _crms_backward)
scale_norm = _EagerOp("scale_norm", _scale_norm_fwd, _scale_setup, _scale_backward)
layer_norm = _EagerOp("layer_norm", _layer_norm_fwd, _ln_setup, _ln_backward)
add_rms_norm = _EagerOp("add_rms_norm", _add_rms_norm_fwd, _add_setup, _add_backward)
add_layer_norm = _EagerOp("add_layer_norm", _add_layer_norm_fwd, _add_setup, _add_backward)
dyt = _EagerOp("dyt", _dyt_fwd, _dyt_setup, _dyt_backward)
TOKEN_OPS: dict[str, _EagerOp] = {op.op.__name__.split(".")[-1]: op for op in
                                  (rms_norm, crms_norm, scale_norm, layer_norm, add_rms_norm, add_layer_norm, dyt)}
