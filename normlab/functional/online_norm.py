"""Functional Online Normalization (Chiley, Sharapov, Kosson, Koster, Reece, Samaniego de la Fuente, Subbiah, James,
"Online Normalization for Training Neural Networks", NeurIPS 2019, https://arxiv.org/abs/1905.05894): each sample is
normalised with streaming statistics of the samples before it, and the backward pass replaces BatchNorm's projection
with two streaming control processes.

See :class:`normlab.nn.OnlineNorm`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.functional._checks import apply_affine
from normlab.functional._vision import channel_first, per_channel

__all__ = ["online_norm"]

ECMS = ("ac", "ls", None)
#: Activation clamping's bound (the official module's ``clamp_val``).
AC_CLAMP = 5.0


class _OnlineNormalize(torch.autograd.Function):
    """``y_t = (x_t − μ_{t−1}) / sqrt(σ²_{t−1} + eps)`` sample by sample (paper Eq. 9-11), updating the forward
    streams in place; backward runs the control processes ``u``, ``v`` (paper Algorithm 1), updating them in place."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x3: Tensor, mean_buf: Tensor, var_buf: Tensor, u_buf: Tensor, v_buf: Tensor,
        alpha_fwd: float, alpha_bkw: float, eps: float,
    ) -> Tensor:
        mean, var = mean_buf.to(x3.dtype), var_buf.to(x3.dtype)
        ys, scales = [], []
        for t in range(x3.shape[0]):
            xt = x3[t]
            scale = torch.sqrt(var + eps)
            ys.append((xt - mean[:, None]) / scale[:, None])
            scales.append(scale)
            q, m = torch.var_mean(xt, -1, correction=0)
            d = m - mean
            var = alpha_fwd * var + (1.0 - alpha_fwd) * q + alpha_fwd * (1.0 - alpha_fwd) * d.square()
            mean = mean + (1.0 - alpha_fwd) * d
        mean_buf.copy_(mean)
        var_buf.copy_(var)
        y = torch.stack(ys) if ys else torch.empty_like(x3)
        s = torch.stack(scales) if scales else x3.new_empty((0, x3.shape[1]))
        ctx.save_for_backward(y, s)
        ctx.control = (u_buf, v_buf)
        ctx.alpha_bkw = alpha_bkw
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        y, s = ctx.saved_tensors
        u_buf, v_buf = ctx.control
        u, v = u_buf.to(grad.dtype), v_buf.to(grad.dtype)
        k = 1.0 - ctx.alpha_bkw
        grads = []
        for t in range(grad.shape[0]):
            delta = grad[t] - k * v[:, None] * y[t]  # remove the output direction (v tracks it)
            v = v + (delta * y[t]).mean(-1)
            gx = delta / s[t][:, None] - k * u[:, None]  # remove the mean direction (u tracks it)
            u = u + gx.mean(-1)
            grads.append(gx)
        with torch.no_grad():
            u_buf.copy_(u)
            v_buf.copy_(v)
        gx_all = torch.stack(grads) if grads else torch.zeros_like(grad)
        return gx_all, None, None, None, None, None, None, None


def online_norm(
    x: Tensor, num_features: int, running_mean: Tensor, running_var: Tensor, control_u: Tensor | None = None,
    control_v: Tensor | None = None, weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
    alpha_fwd: float = 0.999, alpha_bkw: float = 0.99, eps: float = 1e-5, ecm: str | None = "ac", channel_dim: int = 1,
) -> Tensor:
    """Online Normalization, then the affine and the error-compensation module ``ecm`` (``"ac"``: clamp to
    ``[−5, 5]``; ``"ls"``: divide each sample by its root mean square over ``(C, *)``; ``None``: nothing).

    Training processes the batch as a stream of samples in batch order, updating ``running_mean``/``running_var`` in
    the forward and ``control_u``/``control_v`` in the backward; eval normalises with the running statistics.
    See :class:`normlab.nn.OnlineNorm`.
    """
    op = "online_norm"
    xs = channel_first(x, num_features, channel_dim, op)
    if ecm not in ECMS:
        raise ValueError(f"{op}: expected ecm in {ECMS}, got {ecm!r}")
    if training:
        if control_u is None or control_v is None:
            raise ValueError(f"{op}: training needs the control buffers control_u and control_v; got None")
        n = xs.shape[0]
        x3 = xs.reshape(n, num_features, xs.numel() // max(n * num_features, 1))
        y = _OnlineNormalize.apply(x3, running_mean, running_var, control_u, control_v, alpha_fwd, alpha_bkw, eps)
        y = y.reshape(xs.shape)
    else:
        y = (xs - per_channel(running_mean, xs.dim(), xs.dtype)) * per_channel(
            torch.rsqrt(running_var.to(xs.dtype) + eps), xs.dim(), xs.dtype)
    y = apply_affine(y, weight, bias, 1)
    if ecm == "ac":
        y = torch.clamp(y, -AC_CLAMP, AC_CLAMP)
    elif ecm == "ls" and y.numel() > 0:
        y = y * torch.rsqrt(y.square().mean(tuple(range(1, y.dim())), keepdim=True) + eps)
    return y.to(x.dtype)
