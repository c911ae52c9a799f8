"""The statistic methods of test-time adaptation, one norm layer at a time: TBN, α-BN, UnMix-TNS and RoTTA's robust BN.

* TBN (test-batch statistics; Nado et al. 2020, https://arxiv.org/abs/2006.10963, Schneider et al. 2020,
  https://arxiv.org/abs/2006.16971; the ``norm`` baseline of Tent, https://arxiv.org/abs/2006.10726): the norm's
  own training-mode forward on the test batch.
* α-BN (You, Li, Zhao, "Test-time Batch Statistics Calibration for Covariate Shift", 2021,
  https://arxiv.org/abs/2110.04065): ``μ = (1-α)·μ_src + α·μ_test``, ``σ² = (1-α)·σ²_src + α·σ²_test`` with the
  unbiased test variance, as the benchmark's ``AlphaBatchNorm``.
* UnMix-TNS (Tomar et al., ICLR 2024, https://arxiv.org/abs/2401.08328, §3): K statistic components, instance
  statistics un-mixed by a softmax over cosine similarities, online component updates.
* RoTTA's robust BN (Yuan et al., CVPR 2023, https://arxiv.org/abs/2303.13899, §3.2 "Robust batch normalization"):
  an EMA of the batch statistics starting from the source ones, and normalization with the updated EMA.

α-BN, UnMix-TNS and RBN normalize by hand, so they take a layer whose eval form is exactly
``weight·(x - running_mean)/sqrt(running_var + eps) + bias`` (:func:`bn_form`); TBN takes any norm with running
statistics and a batch-statistic training forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.functional._checks import affine_in, apply_affine, compute_dtype
from normlab.nn._base import BatchStatView, batch_stat_affine
from normlab.tta._common import (
    batch_rows,
    check_values_per_channel,
    class_forward,
    find_mask,
    instance_rows,
    values_per_channel,
    weighted_moments,
)
from normlab.walk import norm_protocol

__all__ = ["AlphaBN", "RobustBN", "TestBatchNorm", "UnMixTNS", "bn_form"]


def bn_form(module: nn.Module) -> tuple[BatchStatView | None, str]:
    """``(view, "")`` when ``module``'s eval form is ``weight·(x - running_mean)/sqrt(running_var + eps) + bias``
    per channel (checked against its :meth:`folded_affine`), else ``(None, why not)``."""
    proto = norm_protocol(module)
    view = proto.batch_stat_view()
    if view is None:
        return None, "no running statistics (track_running_stats=False): it normalizes with batch statistics already"
    if view.running_mean is None or view.transform is not None:
        return None, "its running statistic is a second moment, not a mean and variance that can be mixed or un-mixed"
    was = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        folded = proto.folded_affine()
    except (TypeError, RuntimeError, NotImplementedError) as exc:
        return None, f"its eval form is not a per-channel affine ({exc})"
    finally:
        for m, mode in was:
            m.training = mode
    weight, bias = _affine(module)
    scale, shift = batch_stat_affine(view.running_mean, view.running_var, weight, bias, view.eps)
    same = folded.keep is None and torch.allclose(folded.scale, scale) and torch.allclose(folded.shift, shift)
    if not same:
        return None, ("its eval form is not weight*(x - mean)/sqrt(var + eps) + bias (it has other terms, e.g. "
                      "RepBN's αx)")
    return view, ""


def _affine(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    return (w if isinstance(w, Tensor) else None), (b if isinstance(b, Tensor) else None)


def _view(module: nn.Module) -> BatchStatView:
    """The current view (fetched per call: ``model.to(...)`` replaces the buffers)."""
    view = norm_protocol(module).batch_stat_view()
    assert view is not None and view.running_mean is not None  # checked by bn_form at adapt time
    return view


def _normalize_rows(rows: Tensor, mean: Tensor, var: Tensor, module: nn.Module, eps: float) -> Tensor:
    """``(rows - mean)/sqrt(var + eps)·weight + bias`` with channels last (the official codes' order of operations)."""
    return apply_affine((rows - mean) / torch.sqrt(var + eps), *_affine(module))


def _blend(a: float | Tensor, source: Tensor, test: Tensor) -> Tensor:
    """``(1 - a)·source + a·test`` in ``test``'s dtype: the mixture every statistic method here normalizes with."""
    return (1.0 - a) * source.to(test.dtype) + a * test


def _back(y_last: Tensor, x: Tensor, cd: int) -> Tensor:
    """Channel-last rows back to ``x``'s layout and dtype."""
    shape = list(x.movedim(cd, -1).shape)
    return y_last.reshape(shape).movedim(-1, cd).to(x.dtype)


class _Layer:
    """One adapted norm: its name (for errors), its channel axis and the method's state."""

    method = ""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.channel_dim = int(norm_protocol(module).channel_dim)

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The norm's forward under the method (installed as the module's ``forward``)."""
        raise NotImplementedError

    def state(self) -> dict[str, Tensor]:
        """The method's own state (not in the module's state dict)."""
        return {}

    def reset(self) -> None:
        """Back to the state at adaptation time (the module's own buffers are restored by the caller)."""


class TestBatchNorm(_Layer):
    """TBN: the norm's training-mode forward, so it normalizes with the test batch's statistics and updates its
    running statistics as in training (never used while adapted). Step counters and other buffers the training
    forward writes (:class:`~normlab.nn._base.RecalibrationPlan` ``counters`` and ``keep``: warm-up schedules) are
    put back after every call."""

    method = "tbn"

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        x = args[0]
        mask = find_mask(args, kwargs)
        check_values_per_channel(x, self.channel_dim, mask, self.method, self.name)
        return train_mode_forward(module, *args, **kwargs)


def train_mode_forward(module: nn.Module, *args: Any, restore_stats: bool = False, **kwargs: Any) -> Any:
    """``module``'s class forward in training mode; its mode flags, step counters and scratch buffers are as before
    afterwards, and with ``restore_stats`` its running statistics too (Tent: batch statistics, buffers unused).

    The buffers to keep are swapped for copies during the call (the forward writes the copies), rather than written
    back afterwards: autograd may have saved them, and an in-place write would invalidate the backward.
    """
    plan = norm_protocol(module).recalibration_plan()
    kept: list[Tensor] = []
    if plan is not None:
        kept = [t for t, _ in plan.counters] + list(plan.keep)
        if restore_stats:
            kept += [t for t, _ in plan.stats] + ([plan.tracked] if plan.tracked is not None else [])
    ids = {id(t) for t in kept}
    slots = [(m, k, b) for m in module.modules() for k, b in m._buffers.items() if b is not None and id(b) in ids]
    modes = [(m, m.training) for m in module.modules()]
    module.train()
    for m, k, b in slots:
        m._buffers[k] = b.detach().clone()
    try:
        return class_forward(module, *args, **kwargs)
    finally:
        for m, mode in modes:
            m.training = mode
        for m, k, b in slots:
            m._buffers[k] = b


class _SourceBlend(_Layer):
    """α-BN and RBN: the test batch's moments over every axis but the channel axis, which :meth:`_normalize` blends
    with the source running statistics (:func:`_blend`); :meth:`_check` first rejects a batch too small for them."""

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        x, mask = args[0], find_mask(args, kwargs)
        self._check(x, mask)
        cd = self.channel_dim % x.dim()
        xc = x.to(compute_dtype(x))
        flat, valid = batch_rows(xc, cd, mask)
        return self._normalize(module, _view(module), x, xc, cd, flat, *weighted_moments(flat, valid, 0))

    def _check(self, x: Tensor, mask: Tensor | None) -> None:
        check_values_per_channel(x, self.channel_dim, mask, self.method, self.name)

    def _normalize(self, module: nn.Module, view: BatchStatView, x: Tensor, xc: Tensor, cd: int, flat: Tensor,
                   count: Tensor, mean: Tensor, var: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The output from the batch's rows ``flat`` (``xc`` channel-last) and their weighted moments."""
        raise NotImplementedError


class AlphaBN(_SourceBlend):
    """α-BN: normalize with ``(1-α)·source + α·test`` statistics, the test variance unbiased (the benchmark's
    ``AlphaBatchNorm`` gets it from a ``momentum=1`` BatchNorm's running variance); source weight, bias and eps."""

    method = "alpha_bn"

    def __init__(self, name: str, module: nn.Module, alpha: float) -> None:
        super().__init__(name, module)
        self.alpha = alpha

    def _normalize(self, module: nn.Module, view: BatchStatView, x: Tensor, xc: Tensor, cd: int, flat: Tensor,
                   count: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        unbiased = var * (count / (count - 1.0))
        assert view.running_mean is not None
        mix_mean = _blend(self.alpha, view.running_mean, mean)
        mix_var = _blend(self.alpha, view.running_var, unbiased)
        w, b = affine_in(xc.dtype, *_affine(module))
        y = F.batch_norm(xc.movedim(cd, 1), mix_mean, mix_var, w, b, False, 0.0, view.eps)
        return y.movedim(1, cd).to(x.dtype)


class RobustBN(_SourceBlend):
    """RoTTA's robust BN: ``μ ← (1-a)·μ + a·μ_B``, ``σ² ← (1-a)·σ² + a·σ²_B`` (biased batch variance) in the running
    buffers, starting from the source statistics, and normalization with the updated values."""

    method = "rotta_rbn"

    def __init__(self, name: str, module: nn.Module, momentum: float) -> None:
        super().__init__(name, module)
        self.momentum = momentum

    def _check(self, x: Tensor, mask: Tensor | None) -> None:
        if values_per_channel(x, self.channel_dim % x.dim(), mask, f"{self.method}: layer {self.name!r}") < 1:
            raise ValueError(f"{self.method}: layer {self.name!r} got no valid value per channel (input of size "
                             f"{list(x.shape)}); expected at least 1")

    def _normalize(self, module: nn.Module, view: BatchStatView, x: Tensor, xc: Tensor, cd: int, flat: Tensor,
                   count: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        assert view.running_mean is not None
        mean = _blend(self.momentum, view.running_mean, mean)
        var = _blend(self.momentum, view.running_var, var)
        with torch.no_grad():
            view.running_mean.copy_(mean)
            view.running_var.copy_(var)
        return _back(_normalize_rows(flat, mean, var, module, view.eps), x, cd)


class UnMixTNS(_Layer):
    """UnMix-TNS: K statistic components ``(μ_k, σ²_k)`` initialised around the source statistics; every sample is
    normalized with the mixture of the components, each pulled towards the sample's instance statistics by its
    assignment ``p_{n,k} = softmax_k(cos(μ̃_n, μ_k)/τ)``; the components then move towards the instance statistics
    they were assigned (momentum ``1 - (1 - m)^{B/B_max}``).

    An input with no position axis (``(N, C)``: one value per sample and channel) has no instance statistics; such
    a call normalizes with the source statistics, as the official code's replacement of ``BatchNorm1d`` does.

    What to expect on short streams and small nets (a consequence of the paper's algorithm, §3, not of this port):
    the per-sample normalization mean is about the mean of the K components, so the random initialisation leaves
    it off the source mean by ``N(0, α_init/(K-1)·σ²_s)`` per channel (0.18·σ_s for K=16, α_init=0.5) until the
    updates wash the noise out; each component moves by about ``λ/K`` per batch when the assignments are spread,
    a time constant of about ``K/λ`` batches (160 for K=16, λ=0.1), the length of one CIFAR-10-C corruption at
    batch 64. A net sensitive to per-channel mean offsets of that size (a 3-BN-layer CNN on 16×16 digits goes from
    2% to 7-52% clean error with such offsets) is worse than its unadapted source model over the first hundred or
    so batches.
    """

    method = "unmix_tns"

    def __init__(self, name: str, module: nn.Module, *, num_components: int, temperature: float, alpha_init: float,
                 batch_size_max: int, generator: torch.Generator | None) -> None:
        super().__init__(name, module)
        view = _view(module)
        assert view.running_mean is not None
        rm, rv = view.running_mean.detach(), view.running_var.detach()
        k = num_components
        if k == 1:
            mu, var = rm[None].clone(), rv[None].clone()
        else:
            noise = torch.randn(k, rm.numel(), generator=generator).to(rm)
            mu = rm[None] + math.sqrt(alpha_init * k / (k - 1)) * rv.sqrt()[None] * noise
            var = ((1.0 - alpha_init) * rv)[None].expand(k, -1).clone()
        self.mean_components, self.var_components = mu, var
        self._initial = (mu.clone(), var.clone())
        self.temperature = temperature
        self.batch_size_max = batch_size_max
        momentum = getattr(module, "momentum", None)
        self.source_momentum = float(momentum) if isinstance(momentum, (int, float)) else 0.1

    def state(self) -> dict[str, Tensor]:
        return {"mean_components": self.mean_components, "var_components": self.var_components}

    def reset(self) -> None:
        self.mean_components = self._initial[0].clone()
        self.var_components = self._initial[1].clone()

    def momentum(self, batch_size: int) -> float:
        """``λ = 1 - (1 - m)^{B/B_max}`` (UnMix-TNS's scaling of the source BN momentum ``m`` by the batch size)."""
        return 1.0 - (1.0 - self.source_momentum) ** (batch_size / self.batch_size_max)

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        x, mask = args[0], find_mask(args, kwargs)
        cd = self.channel_dim % x.dim()
        view = _view(module)
        assert view.running_mean is not None
        xc = x.to(compute_dtype(x))
        rows, valid = instance_rows(xc, cd, mask)  # (B, P, C)
        if rows.shape[1] <= 1:  # no instance statistics: source statistics
            mean, var = view.running_mean.to(xc.dtype), view.running_var.to(xc.dtype)
            return _back(_normalize_rows(rows, mean, var, module, view.eps), x, cd)
        _, inst_mean, inst_var = weighted_moments(rows, valid, 1)  # (B, C)
        comp_mean = self.mean_components.to(device=xc.device, dtype=xc.dtype)
        comp_var = self.var_components.to(device=xc.device, dtype=xc.dtype)
        with torch.no_grad():
            sim = F.normalize(inst_mean.detach(), dim=1) @ F.normalize(comp_mean, dim=1).T  # (B, K)
            p = torch.softmax(sim / self.temperature, dim=1).unsqueeze(-1)  # (B, K, 1)
        mix_mean = _blend(p, comp_mean[None], inst_mean[:, None])  # (B, K, C)
        mix_var = _blend(p, comp_var[None], inst_var[:, None])
        mean = mix_mean.mean(dim=1)
        var = mix_var.mean(dim=1) + mix_mean.square().mean(dim=1) - mean.square()  # law of total variance
        with torch.no_grad():
            lam = self.momentum(x.shape[0])
            self.mean_components = comp_mean + lam * (p * (inst_mean.detach()[:, None] - comp_mean[None])).mean(0)
            self.var_components = comp_var + lam * (p * (inst_var.detach()[:, None] - comp_var[None])).mean(0)
        return _back(_normalize_rows(rows, mean[:, None], var[:, None], module, view.eps), x, cd)
