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
from dataclasses import dataclass
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


def _or(t: Optional[Tensor], x: Tensor) -> Tensor:
    """An optional tensor's pointer argument: ``x`` stands in for ``None`` (the kernel's flag tells it not to read)."""
    return t if t is not None else x


def _forward(x: Tensor) -> tuple[Tensor, Tensor, int, int, int]:
    """``(x contiguous, y, rows, C, block)`` of a forward: one program per row."""
    x, rows, c, block = _rows(x)
    return x, torch.empty_like(x), rows, c, block


@dataclass
class _Backward:
    """A backward's contiguous inputs, its ``dx`` and the per-block partials of the parameter gradients."""

    x: Tensor
    grad: Tensor
    dx: Tensor
    rows: int
    c: int
    block: int
    n: int  # row blocks (programs)
    per: int  # rows per block
    need_w: bool
    need_b: bool
    pw: Tensor
    pb: Tensor

    def partial(self, needed: bool) -> Tensor:
        """Per-block partial sums of a one-element parameter's gradient."""
        return torch.empty(self.n if needed else 0, dtype=torch.float32, device=self.x.device)

    def scalar(self, partial: Tensor, needed: bool) -> Tensor:
        return partial.sum().reshape(1) if needed else self.x.new_empty(0)

    def weight_bias(self) -> tuple[Tensor, Tensor]:
        """``(dweight, dbias)``: the partials summed over the blocks (empty when not requested)."""
        return (self.pw.sum(0) if self.need_w else self.x.new_empty(0),
                self.pb.sum(0) if self.need_b else self.x.new_empty(0))


def _backward(grad: Tensor, x: Tensor, weight: Optional[Tensor], need_w: bool, need_b: bool) -> _Backward:
    x, rows, c, block = _rows(x)
    n, per = _blocks(rows)
    need_w = need_w and weight is not None

    def part(needed: bool) -> Tensor:
        return torch.empty((n, c) if needed else (0,), dtype=torch.float32, device=x.device)

    return _Backward(x, grad.to(x.dtype).contiguous(), torch.empty_like(x), rows, c, block, n, per, need_w, need_b,
                     part(need_w), part(need_b))


def rms_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor], eps: float,
            mode: int, k: int) -> Tensor:
    x, y, rows, c, block = _forward(x)
    if rows:
        _kernels().rms_fwd_kernel[(rows,)](x, y, _or(weight, x), _or(bias, x), _or(scale, x), c, k, eps, MODE=mode,
                                           HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=block)
    return y


def rms_bwd(grad: Tensor, x: Tensor, weight: Optional[Tensor], scale: Optional[Tensor], grad_add: Optional[Tensor],
            eps: float, mode: int, k: int, need_w: bool, need_b: bool,
            need_scale: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b = _backward(grad, x, weight, need_w, need_b)
    ga = grad_add.to(b.x.dtype).contiguous() if grad_add is not None else None
    ps = b.partial(need_scale)
    if b.rows:
        _kernels().rms_bwd_kernel[(b.n,)](
            b.grad, b.x, _or(weight, b.x), _or(scale, b.x), _or(ga, b.x), b.dx, b.pw, b.pb, ps, b.rows, b.per, b.c,
            k, eps, MODE=mode, HAS_W=weight is not None, HAS_GA=ga is not None, NEED_W=b.need_w, NEED_B=need_b,
            NEED_S=need_scale, BLOCK=b.block)
    return b.dx, *b.weight_bias(), b.scalar(ps, need_scale)


def ln_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    x, y, rows, c, block = _forward(x)
    if rows:
        _kernels().ln_fwd_kernel[(rows,)](x, y, _or(weight, x), _or(bias, x), c, eps, HAS_W=weight is not None,
                                          HAS_B=bias is not None, BLOCK=block)
    return y


def ln_bwd(grad: Tensor, x: Tensor, weight: Optional[Tensor], grad_add: Optional[Tensor], eps: float, need_w: bool,
           need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    b = _backward(grad, x, weight, need_w, need_b)
    ga = grad_add.to(b.x.dtype).contiguous() if grad_add is not None else None
    if b.rows:
        _kernels().ln_bwd_kernel[(b.n,)](
            b.grad, b.x, _or(weight, b.x), _or(ga, b.x), b.dx, b.pw, b.pb, b.rows, b.per, b.c, eps,
            HAS_W=weight is not None, HAS_GA=ga is not None, NEED_W=b.need_w, NEED_B=need_b, BLOCK=b.block)
    return b.dx, *b.weight_bias()


def add_norm_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                 mode: int) -> tuple[Tensor, Tensor]:
    x, y, rows, c, block = _forward(x)
    residual = residual.to(x.dtype).contiguous()
    h = torch.empty_like(x)
    if rows:
        _kernels().add_norm_fwd_kernel[(rows,)](x, residual, y, h, _or(weight, x), _or(bias, x), c, eps, MODE=mode,
                                                HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=block)
    return y, h


def dyt_fwd(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    x, y, rows, c, block = _forward(x)
    if rows:
        _kernels().dyt_fwd_kernel[(rows,)](x, alpha, y, _or(weight, x), _or(bias, x), c, HAS_W=weight is not None,
                                           HAS_B=bias is not None, BLOCK=block)
    return y


def dyt_bwd(grad: Tensor, x: Tensor, alpha: Tensor, weight: Optional[Tensor], need_alpha: bool, need_w: bool,
            need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b = _backward(grad, x, weight, need_w, need_b)
    pa = b.partial(need_alpha)
    if b.rows:
        _kernels().dyt_bwd_kernel[(b.n,)](
            b.grad, b.x, alpha, _or(weight, b.x), b.dx, pa, b.pw, b.pb, b.rows, b.per, b.c, HAS_W=weight is not None,
            NEED_A=need_alpha, NEED_W=b.need_w, NEED_B=need_b, BLOCK=b.block)
    dw, db = b.weight_bias()
    return b.dx, b.scalar(pa, need_alpha), dw, db
