"""Small re-implementations of the official TTA codes, written from their algorithms and independent of normlab.tta.

They follow the official codes' structure: every BatchNorm module (found by ``isinstance``, as the official codes do)
is replaced by a module computing the method's forward, holding the original layer as ``.bn``. Channel-first inputs
``(N, C, *)`` and token inputs ``(B, N, C)`` (``channel_dim=-1``) are both handled by moving the channel axis to 1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import normlab.nn as nlnn

BN_TYPES = (_BatchNorm, nlnn.BatchNorm)
AFFINE_NORM_TYPES = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nlnn.BatchNorm, nlnn.LayerNorm, nlnn.GroupNorm)


def channel_dim_of(bn: nn.Module) -> int:
    return int(getattr(bn, "channel_dim", 1))


def _per_channel(t: Tensor, like: Tensor) -> Tensor:
    """``(C,)`` -> broadcastable against a channel-first ``like``."""
    return t.reshape(1, -1, *([1] * (like.dim() - 2)))


def _affine(y: Tensor, bn: nn.Module) -> Tensor:
    if bn.weight is not None:
        y = y * _per_channel(bn.weight, y)
    if bn.bias is not None:
        y = y + _per_channel(bn.bias, y)
    return y


def swap_bns(model: nn.Module, wrap: Callable[[str, nn.Module], nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with every BatchNorm replaced by ``wrap(name, bn)``."""
    model = copy.deepcopy(model)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, BN_TYPES)]
    for name, m in found:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, wrap(name, m))
    return model.eval()


class RefTBN(nn.Module):
    """Tent's ``norm``: BatchNorm in train mode: biased batch variance to normalize, running EMA of the unbiased one."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        cd = channel_dim_of(self.bn)
        xc = x.movedim(cd, 1)
        dims = [0, *range(2, xc.dim())]
        n = xc.numel() // xc.shape[1]
        mean, var = xc.mean(dims), xc.var(dims, unbiased=False)
        m = self.bn.momentum
        with torch.no_grad():
            self.bn.running_mean.mul_(1 - m).add_(m * mean)
            self.bn.running_var.mul_(1 - m).add_(m * var * n / (n - 1))
            self.bn.num_batches_tracked.add_(1)
        y = (xc - _per_channel(mean, xc)) / torch.sqrt(_per_channel(var, xc) + self.bn.eps)
        return _affine(y, self.bn).movedim(1, cd)


class RefAlphaBN(nn.Module):
    """bethgelab's ``AlphaBatchNorm``: test statistics from a ``BatchNorm(affine=False, momentum=1.0)`` in train mode,
    mixed ``(1 - alpha)·layer + alpha·test``, then ``F.batch_norm`` in eval mode with the layer's affine and eps."""

    def __init__(self, bn: nn.Module, alpha: float) -> None:
        super().__init__()
        self.bn, self.alpha = bn, alpha
        self.norm = nn.BatchNorm1d(bn.num_features, affine=False, momentum=1.0).to(bn.running_mean.dtype)

    def forward(self, x: Tensor) -> Tensor:
        cd = channel_dim_of(self.bn)
        xc = x.movedim(cd, 1)
        self.norm.train()  # the rest of the model is in eval mode
        self.norm(xc.reshape(xc.shape[0], xc.shape[1], -1))
        a = self.alpha
        mean = (1 - a) * self.bn.running_mean + a * self.norm.running_mean
        var = (1 - a) * self.bn.running_var + a * self.norm.running_var
        return F.batch_norm(xc, mean, var, self.bn.weight, self.bn.bias, False, 0, self.bn.eps).movedim(1, cd)


class RefRBN(nn.Module):
    """RoTTA's ``RobustBN``: ``mean = (1-a)·source + a·batch`` (biased batch variance), stored, used to normalize."""

    def __init__(self, bn: nn.Module, momentum: float) -> None:
        super().__init__()
        self.bn, self.momentum = bn, momentum

    def forward(self, x: Tensor) -> Tensor:
        cd = channel_dim_of(self.bn)
        xc = x.movedim(cd, 1)
        dims = [0, *range(2, xc.dim())]
        b_var, b_mean = torch.var_mean(xc, dim=dims, unbiased=False)
        a = self.momentum
        mean = (1 - a) * self.bn.running_mean + a * b_mean
        var = (1 - a) * self.bn.running_var + a * b_var
        with torch.no_grad():
            self.bn.running_mean.copy_(mean)
            self.bn.running_var.copy_(var)
        y = (xc - _per_channel(mean, xc)) / torch.sqrt(_per_channel(var, xc) + self.bn.eps)
        return _affine(y, self.bn).movedim(1, cd)


def unmix_init(bn: nn.Module, k: int, alpha_init: float, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """UnMix-TNS's components: ``μ_k = μ_s + sqrt(α·K/(K-1))·σ_s·ε_k``, ``σ²_k = (1-α)·σ²_s`` (K=1: the source)."""
    rm, rv = bn.running_mean.detach(), bn.running_var.detach()
    if k == 1:
        return rm[None].clone(), rv[None].clone()
    assert noise is not None
    mu = rm[None] + math.sqrt(alpha_init * k / (k - 1)) * rv.sqrt()[None] * noise
    return mu, ((1 - alpha_init) * rv)[None].repeat(k, 1)


class RefUnMix(nn.Module):
    """UnMix-TNS's layer (ICLR 2024, §3): instance statistics, softmax assignments over cosine similarities with the
    components (τ), un-mixed per-instance statistics (law of total variance), then the component update."""

    def __init__(self, bn: nn.Module, mu: Tensor, var: Tensor, tau: float = 0.07, b_max: int = 64) -> None:
        super().__init__()
        self.bn, self.mu, self.var, self.tau, self.b_max = bn, mu.clone(), var.clone(), tau, b_max

    def forward(self, x: Tensor) -> Tensor:
        cd = channel_dim_of(self.bn)
        xc = x.movedim(cd, 1)
        b, c = xc.shape[:2]
        flat = xc.reshape(b, c, -1)
        i_var, i_mean = torch.var_mean(flat, dim=2, unbiased=False)  # (B, C)
        sim = F.cosine_similarity(i_mean[:, None, :], self.mu[None, :, :], dim=2)  # (B, K)
        p = torch.softmax(sim / self.tau, dim=1)
        mu_hat = (1 - p[..., None]) * self.mu[None] + p[..., None] * i_mean[:, None]
        var_hat = (1 - p[..., None]) * self.var[None] + p[..., None] * i_var[:, None]
        mean = mu_hat.mean(1)
        var = var_hat.mean(1) + (mu_hat**2).mean(1) - mean**2
        lam = 1 - (1 - self.bn.momentum) ** (b / self.b_max)
        self.mu = self.mu + lam * (p[..., None] * (i_mean[:, None] - self.mu[None])).mean(0)
        self.var = self.var + lam * (p[..., None] * (i_var[:, None] - self.var[None])).mean(0)
        y = (flat - mean[..., None]) / torch.sqrt(var[..., None] + self.bn.eps)
        y = y * self.bn.weight[None, :, None] + self.bn.bias[None, :, None]
        return y.reshape(xc.shape).movedim(1, cd)


def ref_tent(model: nn.Module, lr: float = 1e-3) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Tent's ``configure_model`` + ``collect_params`` + Adam: the model in train mode, all grads off; BatchNorms
    without running statistics (batch statistics always); weight and bias of every norm trainable."""
    model = copy.deepcopy(model)
    model.train()
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, BN_TYPES):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        if isinstance(m, AFFINE_NORM_TYPES):
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(True)
                    params.append(p)
    return model, torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)


def ref_tent_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor) -> Tensor:
    """``forward_and_adapt``: outputs, entropy mean over the batch, backward, step, zero_grad; return the outputs."""
    out: Any = model(x)
    logits = out if isinstance(out, Tensor) else out.logits
    loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean(0)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return logits.detach()
