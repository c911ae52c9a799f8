"""The ``@triton.jit`` kernels behind :mod:`normlab.kernels._triton` (imported on first launch, so Triton reads
``TRITON_INTERPRET`` when the kernels are defined, which is when it picks the interpreter).

One program normalises one row of ``C`` elements held in a power-of-two block (``BLOCK >= C``; the tail is masked),
with float32 statistics. Backward programs own fixed blocks of consecutive rows and write per-block partial sums of
the parameter gradients, which the caller reduces in a second pass (no atomics: deterministic). Math and paper
references as ``csrc/norms.cpp``; modes of the rms family: 0 RMSNorm (eps inside the root), 1 eps outside,
2 CRMSNorm, 3 ScaleNorm.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The @triton.jit functions are untyped by design: Triton reads parameter annotations (tl.constexpr) itself.


@triton.jit
def _tanh(z):
    # As csrc/row_loops.h: the odd Taylor series through z^15 for |z| < 0.55, else 1 - 2 / (exp(2|z|) + 1) with the
    # sign restored (no cancellation there). NaN stays NaN, +-inf gives +-1.
    az = tl.abs(z)
    big = 1.0 - 2.0 / (tl.exp(2.0 * az) + 1.0)
    big = tl.where(z < 0, -big, big)
    z2 = z * z
    p = z2 * (-929569.0 / 638512875.0) + 21844.0 / 6081075.0
    p = p * z2 + (-1382.0 / 155925.0)
    p = p * z2 + 62.0 / 2835.0
    p = p * z2 + (-17.0 / 315.0)
    p = p * z2 + 2.0 / 15.0
    p = p * z2 + (-1.0 / 3.0)
    small = p * z2 * z + z
    return tl.where(az < 0.55, small, big)


@triton.jit
def _rms_factor(x, cols, C, K, eps, S, MODE: tl.constexpr):
    """(r, c_num, shift, nrm, n) of one row: y = x r; the backward's c = c_num * s."""
    xk = tl.where(cols < K, x, 0.0)
    ss = tl.sum(xk * xk, axis=0)
    shift = ss * 0.0
    nrm = ss * 0.0
    n = ss * 0.0 + 1.0
    if MODE == 0:
        r = 1.0 / tl.sqrt(ss / K + eps)
        c_num = r * r * r / K
    elif MODE == 1:
        rms = tl.sqrt(ss / K)
        r = 1.0 / (rms + eps)
        c_num = r * r / (K * rms)
    elif MODE == 2:
        shift = tl.sum(x, axis=0)
        r = 1.0 / tl.sqrt((ss + shift * shift) / (C + 1) + eps)
        c_num = r * r * r / (C + 1)
    else:
        nrm = tl.sqrt(ss)
        n = tl.where(nrm < eps, eps, nrm)  # keeps a NaN norm, as torch's clamp_min
        r = tl.load(S).to(tl.float32) / n
        c_num = tl.where(nrm >= eps, r / (n * n), 0.0)
    return r, c_num, shift, nrm, n


@triton.jit
def _fwd_row(X, C, BLOCK: tl.constexpr):
    """``(row, cols, in-bounds mask, x in float32)`` of a forward program (one row)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inb = cols < C
    return row, cols, inb, tl.load(X + row * C + cols, mask=inb, other=0.0).to(tl.float32)


@triton.jit
def _affine_store(y, Y, W, B, row, C, cols, inb, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Store ``y * w + b`` (each when given) as the row of ``Y``."""
    if HAS_W:
        y = y * tl.load(W + cols, mask=inb, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=inb, other=0.0).to(tl.float32)
    tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=inb)


@triton.jit
def _bwd_block(W, C, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """``(program, cols, in-bounds mask, w in float32 or ones)`` of a backward program (a block of rows)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inb = cols < C
    w = tl.load(W + cols, mask=inb, other=0.0).to(tl.float32) if HAS_W else tl.full([BLOCK], 1.0, tl.float32)
    return pid, cols, inb, w


@triton.jit
def _bwd_row(X, G, row0, rows, C, cols, inb, BLOCK: tl.constexpr):
    """``(mask, offsets, x, g)`` of row ``row0`` of a block; a last block's missing rows are masked out."""
    row = tl.zeros([BLOCK], tl.int64) + row0  # as a vector: a scalar & vector mask is not int1 everywhere
    m = inb & (row < rows)
    off = row * C + cols
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + off, mask=m, other=0.0).to(tl.float32)
    return m, off, x, g


@triton.jit
def _store_dx(dx, DX, GA, off, m, HAS_GA: tl.constexpr):
    if HAS_GA:  # the fused add's residual gradient, added after dx is rounded (as autograd adds them)
        dx = dx.to(DX.dtype.element_ty).to(tl.float32) + tl.load(GA + off, mask=m, other=0.0).to(tl.float32)
    tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)


@triton.jit
def _store_partials(dw, db, DW, DB, pid, C, cols, inb, NEED_W: tl.constexpr, NEED_B: tl.constexpr):
    """Store the block's partial sums of the weight and bias gradients."""
    if NEED_W:
        tl.store(DW + pid * C + cols, dw, mask=inb)
    if NEED_B:
        tl.store(DB + pid * C + cols, db, mask=inb)


@triton.jit
def rms_fwd_kernel(X, Y, W, B, S, C, K, eps, MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   BLOCK: tl.constexpr):
    row, cols, inb, x = _fwd_row(X, C, BLOCK)
    r, c_num, shift, nrm, n = _rms_factor(x, cols, C, K, eps, S, MODE)
    _affine_store(x * r, Y, W, B, row, C, cols, inb, HAS_W, HAS_B)


@triton.jit
def rms_bwd_kernel(G, X, W, S, GA, DX, DW, DB, DS, rows, rows_per, C, K, eps, MODE: tl.constexpr,
                   HAS_W: tl.constexpr, HAS_GA: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                   NEED_S: tl.constexpr, BLOCK: tl.constexpr):
    pid, cols, inb, w = _bwd_block(W, C, HAS_W, BLOCK)
    dw = tl.zeros([BLOCK], tl.float32)
    db = tl.zeros([BLOCK], tl.float32)
    ds = tl.sum(dw, axis=0)
    start = pid.to(tl.int64) * rows_per
    for i in range(0, rows_per):
        m, off, x, g = _bwd_row(X, G, start + i, rows, C, cols, inb, BLOCK)
        gw = g * w
        r, c_num, shift, nrm, n = _rms_factor(x, cols, C, K, eps, S, MODE)
        s = tl.sum(gw * x, axis=0)
        _store_dx(gw * r - tl.where(cols < K, c_num * s * (x + shift), 0.0), DX, GA, off, m, HAS_GA)
        if NEED_W:
            dw += tl.where(m, g * x * r, 0.0)
        if NEED_B:
            db += g
        if NEED_S:
            ds += tl.where(start + i < rows, s / n, 0.0)
    _store_partials(dw, db, DW, DB, pid, C, cols, inb, NEED_W, NEED_B)
    if NEED_S:
        tl.store(DS + pid, ds)


@triton.jit
def _ln_stats(x, inb, C, eps):
    mean = tl.sum(x, axis=0) / C
    d = tl.where(inb, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
    return mean, rstd


@triton.jit
def ln_fwd_kernel(X, Y, W, B, C, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, inb, x = _fwd_row(X, C, BLOCK)
    mean, rstd = _ln_stats(x, inb, C, eps)
    _affine_store((x - mean) * rstd, Y, W, B, row, C, cols, inb, HAS_W, HAS_B)


@triton.jit
def ln_bwd_kernel(G, X, W, GA, DX, DW, DB, rows, rows_per, C, eps, HAS_W: tl.constexpr, HAS_GA: tl.constexpr,
                  NEED_W: tl.constexpr, NEED_B: tl.constexpr, BLOCK: tl.constexpr):
    pid, cols, inb, w = _bwd_block(W, C, HAS_W, BLOCK)
    dw = tl.zeros([BLOCK], tl.float32)
    db = tl.zeros([BLOCK], tl.float32)
    start = pid.to(tl.int64) * rows_per
    for i in range(0, rows_per):
        m, off, x, g = _bwd_row(X, G, start + i, rows, C, cols, inb, BLOCK)
        mean, rstd = _ln_stats(x, inb, C, eps)
        xhat = tl.where(inb, (x - mean) * rstd, 0.0)
        gw = g * w
        dx = rstd * (gw - tl.sum(gw, axis=0) / C - xhat * (tl.sum(gw * xhat, axis=0) / C))
        _store_dx(dx, DX, GA, off, m, HAS_GA)
        if NEED_W:
            dw += tl.where(m, g * xhat, 0.0)
        if NEED_B:
            db += g
    _store_partials(dw, db, DW, DB, pid, C, cols, inb, NEED_W, NEED_B)


@triton.jit
def add_norm_fwd_kernel(X, R, Y, H, W, B, C, eps, MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        BLOCK: tl.constexpr):
    """h = x + residual rounded to the input dtype (as an eager add); y = norm(h): LayerNorm for MODE < 0."""
    row, cols, inb, x = _fwd_row(X, C, BLOCK)
    res = tl.load(R + row * C + cols, mask=inb, other=0.0).to(tl.float32)
    h_t = (x + res).to(H.dtype.element_ty)
    tl.store(H + row * C + cols, h_t, mask=inb)
    h = h_t.to(tl.float32)
    if MODE < 0:
        mean, rstd = _ln_stats(h, inb, C, eps)
        y = (h - mean) * rstd
    else:
        r, c_num, shift, nrm, n = _rms_factor(h, cols, C, C, eps, X, MODE)
        y = h * r
    _affine_store(y, Y, W, B, row, C, cols, inb, HAS_W, HAS_B)


@triton.jit
def dyt_fwd_kernel(X, A, Y, W, B, C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, inb, x = _fwd_row(X, C, BLOCK)
    _affine_store(_tanh(tl.load(A).to(tl.float32) * x), Y, W, B, row, C, cols, inb, HAS_W, HAS_B)


@triton.jit
def dyt_bwd_kernel(G, X, A, W, DX, DA, DW, DB, rows, rows_per, C, HAS_W: tl.constexpr, NEED_A: tl.constexpr,
                   NEED_W: tl.constexpr, NEED_B: tl.constexpr, BLOCK: tl.constexpr):
    pid, cols, inb, w = _bwd_block(W, C, HAS_W, BLOCK)
    alpha = tl.load(A).to(tl.float32)
    da = tl.zeros([BLOCK], tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    db = tl.zeros([BLOCK], tl.float32)
    start = pid.to(tl.int64) * rows_per
    for i in range(0, rows_per):
        m, off, x, g = _bwd_row(X, G, start + i, rows, C, cols, inb, BLOCK)
        t = _tanh(alpha * x)
        q = g * w * (1.0 - t * t)
        tl.store(DX + off, (alpha * q).to(DX.dtype.element_ty), mask=m)
        if NEED_A:
            da += tl.where(m, q * x, 0.0)
        if NEED_W:
            dw += tl.where(m, g * t, 0.0)
        if NEED_B:
            db += g
    if NEED_A:
        tl.store(DA + pid, tl.sum(da, axis=0))
    _store_partials(dw, db, DW, DB, pid, C, cols, inb, NEED_W, NEED_B)
