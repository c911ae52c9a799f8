"""Triton kernels for the token norms: the CUDA implementation of the ``normlab::`` custom ops.

The functions here have the names and signatures of the C++ extension's (``csrc/norms.cpp``), so a custom op body
calls either through the same code (:func:`normlab.kernels._custom_ops._ext`): ``impl="auto"`` picks them for CUDA
inputs when Triton is installed (the ``gpu`` extra), ``impl="triton"`` asks for them. float64 inputs run the composite
bodies (the kernels compute in float32). Every forward is one program per row; every backward runs programs over
fixed blocks of rows that write per-block partial parameter gradients, summed in a second pass (``sum(0)`` over the
blocks: deterministic, no atomics), and the block count depends only on the row count.

Under ``TRITON_INTERPRET=1`` (read by Triton when the kernels are defined, i.e. on the first launch in a process) the
same kernels run on CPU tensors through Triton's interpreter; the tests use that.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

__all__ = ["add_norm_fwd", "available", "check_triton", "dyt_bwd", "dyt_fwd", "ln_bwd", "ln_fwd", "rms_bwd",
           "rms_fwd", "supports"]

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def available() -> bool:
    """Triton is installed (importing it is deferred to the first launch)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    """Triton runs its interpreter (``TRITON_INTERPRET=1``, read by Triton itself), which takes CPU tensors."""
    import triton

    knobs = getattr(triton, "knobs", None)
    return bool(getattr(getattr(knobs, "runtime", None), "interpret", False))


def check_triton(x: Tensor, op: str) -> None:
    """Raise unless the Triton kernels can run on ``x``."""
    if not available():
        raise RuntimeError(f"{op}: impl='triton' needs Triton (pip install 'normlab[gpu]'); it is not installed")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{op}: impl='triton' needs an input on a CUDA device, got an input on {x.device}")


def supports(x: Tensor) -> bool:
    """The kernels take this input's dtype (float64 runs the composite bodies)."""
    return x.dtype in SUPPORTED


@functools.cache
def _kernels() -> ModuleType:
    from normlab.kernels import _triton_kernels

    return _triton_kernels


def _rows(x: Tensor) -> tuple[Tensor, int, int, int]:
    x = x.contiguous()
    c = x.shape[-1]
    rows = x.numel() // c if c else 0
    return x, rows, c, max(16, 1 << max(c - 1, 0).bit_length())


def _blocks(rows: int) -> tuple[int, int]:
    """(block count, rows per block) of a backward: fixed by the row count, as the CPU kernels'."""
    count = min(max(rows // 16, 1), 256)
    per = max(1, math.ceil(rows / count))
    return max(1, math.ceil(rows / per)), per


def _partial(n: int, c: int, x: Tensor, needed: bool) -> Tensor:
    return torch.empty((n, c) if needed else (0,), dtype=torch.float32, device=x.device)


def _sum(partial: Tensor, needed: bool, x: Tensor) -> Tensor:
    return partial.sum(0) if needed else x.new_empty(0)


def rms_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor], eps: float,
            mode: int, k: int) -> Tensor:
    x, rows, c, block = _rows(x)
    y = torch.empty_like(x)
    if rows:
        _kernels().rms_fwd_kernel[(rows,)](
            x, y, weight if weight is not None else x, bias if bias is not None else x,
            scale if scale is not None else x, c, k, eps, MODE=mode, HAS_W=weight is not None,
            HAS_B=bias is not None, BLOCK=block)
    return y


def rms_bwd(grad: Tensor, x: Tensor, weight: Optional[Tensor], scale: Optional[Tensor], grad_add: Optional[Tensor],
            eps: float, mode: int, k: int, need_w: bool, need_b: bool,
            need_scale: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, rows, c, block = _rows(x)
    grad = grad.to(x.dtype).contiguous()
    ga = grad_add.to(x.dtype).contiguous() if grad_add is not None else None
    dx = torch.empty_like(x)
    n, per = _blocks(rows)
    need_w = need_w and weight is not None
    pw, pb = _partial(n, c, x, need_w), _partial(n, c, x, need_b)
    ps = torch.empty(n if need_scale else 0, dtype=torch.float32, device=x.device)
    if rows:
        _kernels().rms_bwd_kernel[(n,)](
            grad, x, weight if weight is not None else x, scale if scale is not None else x,
            ga if ga is not None else x, dx, pw, pb, ps, rows, per, c, k, eps, MODE=mode, HAS_W=weight is not None,
            HAS_GA=ga is not None, NEED_W=need_w, NEED_B=need_b, NEED_S=need_scale, BLOCK=block)
    ds = ps.sum().reshape(1) if need_scale else x.new_empty(0)
    return dx, _sum(pw, need_w, x), _sum(pb, need_b, x), ds


def ln_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    x, rows, c, block = _rows(x)
    y = torch.empty_like(x)
    if rows:
        _kernels().ln_fwd_kernel[(rows,)](
            x, y, weight if weight is not None else x, bias if bias is not None else x, c, eps,
            HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=block)
    return y


def ln_bwd(grad: Tensor, x: Tensor, weight: Optional[Tensor], grad_add: Optional[Tensor], eps: float, need_w: bool,
           need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    x, rows, c, block = _rows(x)
    grad = grad.to(x.dtype).contiguous()
    ga = grad_add.to(x.dtype).contiguous() if grad_add is not None else None
    dx = torch.empty_like(x)
    n, per = _blocks(rows)
    need_w = need_w and weight is not None
    pw, pb = _partial(n, c, x, need_w), _partial(n, c, x, need_b)
    if rows:
        _kernels().ln_bwd_kernel[(n,)](
            grad, x, weight if weight is not None else x, ga if ga is not None else x, dx, pw, pb, rows, per, c,
            eps, HAS_W=weight is not None, HAS_GA=ga is not None, NEED_W=need_w, NEED_B=need_b, BLOCK=block)
    return dx, _sum(pw, need_w, x), _sum(pb, need_b, x)


def add_norm_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                 mode: int) -> tuple[Tensor, Tensor]:
    x, rows, c, block = _rows(x)
    residual = residual.to(x.dtype).contiguous()
    y, h = torch.empty_like(x), torch.empty_like(x)
    if rows:
        _kernels().add_norm_fwd_kernel[(rows,)](
            x, residual, y, h, weight if weight is not None else x, bias if bias is not None else x, c, eps,
            MODE=mode, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=block)
    return y, h


def dyt_fwd(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    x, rows, c, block = _rows(x)
    y = torch.empty_like(x)
    if rows:
        _kernels().dyt_fwd_kernel[(rows,)](
            x, alpha, y, weight if weight is not None else x, bias if bias is not None else x, c,
            HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=block)
    return y


def dyt_bwd(grad: Tensor, x: Tensor, alpha: Tensor, weight: Optional[Tensor], need_alpha: bool, need_w: bool,
            need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, rows, c, block = _rows(x)
    grad = grad.to(x.dtype).contiguous()
    dx = torch.empty_like(x)
    n, per = _blocks(rows)
    need_w = need_w and weight is not None
    pw, pb = _partial(n, c, x, need_w), _partial(n, c, x, need_b)
    pa = torch.empty(n if need_alpha else 0, dtype=torch.float32, device=x.device)
    if rows:
        _kernels().dyt_bwd_kernel[(n,)](
            grad, x, alpha, weight if weight is not None else x, dx, pa, pw, pb, rows, per, c,
            HAS_W=weight is not None, NEED_A=need_alpha, NEED_W=need_w, NEED_B=need_b, BLOCK=block)
    da = pa.sum().reshape(1) if need_alpha else x.new_empty(0)
    return dx, da, _sum(pw, need_w, x), _sum(pb, need_b, x)
