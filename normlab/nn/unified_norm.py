"""Unified Normalization (Yang, Dong, Zhu, Zhu, Zhang, Li, Yuan, "Unified Normalization for Accelerating and
Stabilizing Transformers", ACM MM 2022, https://arxiv.org/abs/2208.01313), the official ``UN1d`` semantics
(hikvision-research/Unified-Normalization @ 0ce9bf26), with padding masks and cross-rank statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.functional.unified_norm import unified_norm
from normlab.kernels._scope import Impl
from normlab.nn._base import NormBase, RecalibrationPlan, check_int, check_unit
from normlab.nn._quadratic_mean import QuadraticMeanProtocol
from normlab.registry import Paper, register_norm

__all__ = ["UnifiedNorm"]


def _window_sizes(window_size: Any) -> tuple[int, int]:
    sizes = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
    if len(sizes) != 2 or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in sizes):
        raise ValueError(
            f"unified_norm: expected window_size to be an int >= 1 or a pair (forward, backward) of them, "
            f"got {window_size!r}"
        )
    return int(sizes[0]), int(sizes[1])


@register_norm(
    "unified_norm", functional=unified_norm, layout="token",
    has_running_stats=True, batch_dependent=True, foldable=True, custom_backward=True,
    paper=Paper("Unified Normalization for Accelerating and Stabilizing Transformers", "https://arxiv.org/abs/2208.01313"),
    aliases=("un", "un1d"),
    samples=({"outlier_filtration": True}, {"window_size": (3, 2)}, {"warmup_iters": 0}, {"affine": False}),
    description="batch 2nd moment, window geometric mean, outlier filter, smoothed backward; folds at eval",
)
class UnifiedNorm(QuadraticMeanProtocol, NormBase):
    r"""Unified Normalization (UN1d) for Transformer token tensors, with padding masks.

    Paper: Yang et al., ACM MM 2022, https://arxiv.org/abs/2208.01313. No mean is subtracted (official code).

    Training step ``t = iters + 1`` (``iters`` counts train-mode forward calls), window ``k = k_f``:

    1. :math:`x^2_c = \mathrm{mean}_{valid\ tokens}\, x_{t,c}^2`; :math:`\rho` = unbiased variance of
       ``sqrt(buffer_x2)`` pooled over all ``k×C`` entries, taken before the batch is inserted.
    2. ``buffer_x2[t mod k] ← x²``. With ``outlier_filtration`` and ``t ≥ warmup_iters``: if any channel has
       ``AM − GM > ρ·k`` over the window, the slot gets ``running_var`` instead, the step is skipped
       (``skip_counter += 1``).
    3. ``v = x²`` if ``t ≤ k`` or ``t < warmup_iters`` or skipped (or ``k = 1``), else the window's geometric mean.
    4. :math:`y = \gamma \odot x / \sqrt{v + \epsilon} + \beta`;
       ``running_var ← momentum·running_var + (1−momentum)·v`` (outlier steps included).

    Backward (``k = k_b``): ``r = clamp(sqrt(v+eps)/sqrt(running_var_old+eps), 1/5, 5)`` after
    ``max(1000, warmup_iters)`` steps (else 1); ``g = dY·γ·r``; ``gz`` = mean over all positions (padding
    included) of ``g·z``; ``buffer_gz[t mod k] ← ema_gz`` if skipped else ``gz``; ``m = gz`` early / when skipped,
    else the window mean; ``ema_gz ← momentum·ema_gz + (1−momentum)·m``; ``dx = (g − μ·z)/sqrt(v+eps)`` with
    ``μ = m`` when skipped else the new ``ema_gz``; ``dγ = Σ dY·r·z``, ``dβ = Σ dY``.

    Eval: ``y = γ ⊙ x / sqrt(running_var + eps) + β``, a per-channel affine (foldable).

    Under an initialised ``torch.distributed`` the batch statistic and the backward's ``gz`` are all-reduced over
    ``process_group`` (the official code keeps them per GPU); ``sync_stats=False`` opts out.

    Args:
        num_features: channel count ``C``.
        window_size: ``k`` for forward and backward, or a pair ``(k_f, k_b)``. Default ``4``.
        warmup_iters: Default ``4000``. Reset ``iters`` (:meth:`restart_warmup`) before fine-tuning.
        outlier_filtration: Default ``False`` (official docstring: False for NLP, True for CV).
        eps: inside the root. Default ``1e-5``.
        momentum: weight of the OLD value in every EMA. Default ``0.9``.
        affine: learn ``weight`` (init 1) and ``bias`` (init 0). Default ``True``.
        channel_dim: must be ``-1``.
        process_group: ``torch.distributed`` group (``None`` = WORLD); ``sync_stats`` to opt out.
        impl: ``"auto"`` (default), ``"composite"`` or ``"cpu"``: the training step runs fused kernels unless
            ``"composite"`` (:func:`normlab.kernels.use_impl` sets it for a scope).

    Shape:
        input ``(B, N, C)`` or ``(N, C)``; ``mask`` ``(B, N)`` / ``(N,)``, True/1 = valid. Output: input's shape
        and dtype; float16/bfloat16 statistics are computed in float32.

    Example:
        >>> un = UnifiedNorm(8, window_size=4, warmup_iters=4000)
        >>> un(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self, num_features: int, *, window_size: int | tuple[int, int] = 4, warmup_iters: int = 4000,
        outlier_filtration: bool = False, eps: float = 1e-5, momentum: float = 0.9, affine: bool = True,
        channel_dim: int = -1, process_group: Any = None, sync_stats: bool = True,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None, impl: Impl = "auto",
    ) -> None:
        super().__init__(num_features, channel_dim, "token", impl=impl)
        op = "unified_norm"
        kf, kb = _window_sizes(window_size)
        self.window_size = (kf, kb)
        self.warmup_iters = check_int(op, "warmup_iters", warmup_iters)
        self.outlier_filtration = outlier_filtration
        self.eps, self.momentum = eps, check_unit(op, "momentum", momentum)
        self.process_group, self.sync_stats = process_group, sync_stats
        self._init_affine(num_features, weight=affine, bias=affine, device=device, dtype=dtype)
        C = num_features  # noqa: N806
        self._init_stats(
            [("running_var", (C,), 1.0), ("ema_gz", (C,), 0.0), ("iters", (), 0), ("buffer_x2", (kf, C), 0.0),
             ("buffer_gz", (kb, C), 0.0), ("skip_counter", (), 0)],
            device=device, dtype=dtype,
        )
        self.reset_parameters()

    kernel_op = "unified_norm"

    running_var: Tensor
    ema_gz: Tensor
    iters: Tensor
    buffer_x2: Tensor
    buffer_gz: Tensor
    skip_counter: Tensor
    running_stat = "running_var"

    def recalibration_plan(self) -> RecalibrationPlan | None:
        """Step t = 1 <= window: the statistic is the batch second moment (no window mean, no outlier filter,
        r = 1); momentum 0 makes the update ``running_var <- batch second moment``. The window is put back after."""
        return RecalibrationPlan(
            [(self.running_var, 1.0)], overrides=[(self, "momentum", 0.0), (self, "outlier_filtration", False)],
            counters=[(self.iters, 0)], keep=[self.buffer_x2, self.buffer_gz, self.ema_gz, self.skip_counter],
        )
