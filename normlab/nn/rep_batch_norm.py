"""RepBN and progressive PRepBN from SLAB (Guo, Chen, Tang, Wang, "SLAB: Efficient Transformers with Simplified
Linear Attention and Progressive Re-parameterized Batch Normalization", ICML 2024, https://arxiv.org/abs/2405.11582),
following the official code (xinghaochen/SLAB @ f58db00b: ``RepBN`` and ``LinearNorm``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from normlab.functional.rep_batch_norm import prep_batch_norm, prep_lambda, rep_batch_norm
from normlab.kernels._scope import Impl
from normlab.nn._base import (
    BatchNormProtocol,
    BatchStatView,
    FoldedAffine,
    NormBase,
    RecalibrationPlan,
    bn_folded_affine,
    bn_recalibration_plan,
    check_int,
    check_unit,
)
from normlab.nn.batch_norm import init_bn_state
from normlab.registry import Paper, create_norm, get_norm, register_norm

__all__ = ["PRepBatchNorm", "RepBatchNorm"]

_PAPER = Paper(
    "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized Batch "
    "Normalization",
    "https://arxiv.org/abs/2405.11582",
)


def _build_norm1(
    norm1: str | Callable[..., nn.Module], num_features: int, eps: float | None, **factory: Any
) -> nn.Module:
    """PRepBN's LN branch; ``eps`` goes only to a norm that takes one (DyT has none)."""
    target = get_norm(norm1).cls if isinstance(norm1, str) else norm1
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume it takes eps, as most norms do
        params = [inspect.Parameter("eps", inspect.Parameter.KEYWORD_ONLY)]  # type: ignore[assignment]
    takes_eps = any(p.name == "eps" or p.kind is p.VAR_KEYWORD for p in params)
    if takes_eps:
        factory["eps"] = 1e-6 if eps is None else eps
    elif eps is not None:
        raise TypeError(f"prep_batch_norm: norm1={norm1!r} takes no eps, so norm1_eps must be None, got {eps!r}")
    return create_norm(norm1, num_features, **factory)


@register_norm(
    "rep_batch_norm", functional=rep_batch_norm, layout="any",
    has_running_stats=True, batch_dependent=True, foldable=True,
    paper=_PAPER,
    aliases=("repbn",),
    samples=({"alpha_init": 0.0, "weight_init": 0.0}, {"channel_dim": 1}, {"momentum": None}, {"affine": False}),
    description="BatchNorm + learnable scalar skip alpha*x (SLAB); a per-channel affine at eval",
)
class RepBatchNorm(BatchNormProtocol, NormBase):
    r"""RepBN: batch normalization plus a learnable scalar skip, for token tensors with padding masks.

    Paper: Guo et al., SLAB, ICML 2024, https://arxiv.org/abs/2405.11582.

    .. math:: y = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta + \alpha x

    ``μ``, ``σ²`` (biased) are per channel over all valid tokens in training (the running buffers get the
    unbiased variance, torch BatchNorm semantics) and the running buffers in eval, where the norm is the
    per-channel affine ``a = γ/sqrt(running_var+eps) + α``, ``c = β − γ·running_mean/sqrt(running_var+eps)``.

    Padding positions are transformed with the same per-channel statistics as valid ones (their values do not
    enter the statistics); the official LLaMA variant instead passes them through as ``x + αx``.

    Args:
        num_features: channel count ``C``.
        eps: Default ``1e-5`` (the LLaMA variant uses ``1e-6``).
        momentum: running-stat EMA factor (``None`` = cumulative average). Default ``0.1``.
        alpha_init: initial α (a scalar parameter). Default ``1.0`` (vision repos; LLaMA variant ``0``).
        weight_init: initial γ. Default ``1.0`` (LLaMA variant ``0``).
        affine: learn γ and β. Default ``True``.
        channel_dim: ``-1`` (default, tokens ``(*, C)``) or ``1`` for ``(N, C, *)``.
        process_group: ``torch.distributed`` group whose ranks share statistics in training (``None`` = WORLD).
        sync_stats: all-reduce the statistics when ``torch.distributed`` is initialised. Default ``True``.
        impl: ``"auto"`` (default), ``"composite"`` or ``"cpu"``: the training forward/backward of token tensors
            runs a fused kernel unless ``"composite"`` (:func:`normlab.kernels.use_impl` sets it for a scope).

    Shape:
        input ``(B, N, C)`` / ``(N, C)`` (or ``(N, C, *)``); ``mask`` the input's shape without the channel axis.
        Output: the input's shape and dtype (statistics of float16/bfloat16 in float32).

    Example:
        >>> m = RepBatchNorm(8)
        >>> m(torch.randn(2, 5, 8), mask=torch.ones(2, 5, dtype=torch.bool)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1, alpha_init: float = 1.0,
        weight_init: float = 1.0, affine: bool = True, channel_dim: int = -1, process_group: Any = None,
        sync_stats: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        impl: Impl = "auto",
    ) -> None:
        super().__init__(num_features, channel_dim, impl=impl)
        self.eps = eps
        self.momentum = check_unit("rep_batch_norm", "momentum", momentum, optional=True)
        self.alpha_init, self.weight_init = float(alpha_init), float(weight_init)
        self.process_group, self.sync_stats = process_group, sync_stats
        self.alpha = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        init_bn_state(self, affine, True, device, dtype)
        self.reset_parameters()

    kernel_op = "rep_batch_norm"

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def _param_init(self) -> dict[str, float]:
        return {"alpha": self.alpha_init, "weight": self.weight_init, "bias": 0.0}

    def folded_affine(self) -> FoldedAffine:
        """``scale = γ/sqrt(running_var + eps) + α``, ``shift = β − γ·running_mean/sqrt(running_var + eps)``."""
        bn = bn_folded_affine(self)
        return FoldedAffine(bn.scale + self.alpha.detach().double(), bn.shift)


@register_norm(
    "prep_batch_norm", functional=prep_batch_norm, layout="token",
    has_running_stats=True, batch_dependent=True, foldable=True,
    paper=_PAPER,
    aliases=("prepbn", "linear_norm", "progressive_rep_batch_norm"),
    samples=({"total_steps": 4}, {"total_steps": 0}, {"norm1": "rms_norm"}),
    description="SLAB progressive LayerNorm -> RepBN: lambda*LN + (1-lambda)*RepBN, lambda ramps 1 -> 0",
)
class PRepBatchNorm(NormBase):
    r"""Progressive re-parameterized BatchNorm (SLAB's ``LinearNorm``): LayerNorm morphing into RepBN in training.

    Paper: Guo et al., SLAB, ICML 2024, https://arxiv.org/abs/2405.11582.

    Training forward: during the warm phase (``warm > 0`` remaining steps) ``y = norm1(x)`` (no batch statistics);
    afterwards

    .. math:: y = \lambda\, \mathrm{norm1}(x) + (1 - \lambda)\, \mathrm{RepBN}(x), \qquad
              \lambda = r_0 \cdot \mathrm{iter} / \mathrm{total\_step}

    with ``iter`` read before it is decremented, so λ = 1, 1−1/T, …, 1/T, 0, 0, … over the forwards after the
    warm phase. RepBN's running statistics update on every post-warm training forward, even at λ ≈ 1.
    Eval: always ``RepBN(x)`` with running statistics. The schedule lives in buffers (``warm``, ``iter``,
    ``total_step``, ``num_step``), so a state dict resumes the ramp where it stopped. With ``decrement_every=n``
    the counters move once per ``n`` training forwards (the LLaMA variant uses 16 = its gradient accumulation).

    Foldable in eval mode, at any point of the schedule: eval always computes ``RepBN(x)`` with running statistics,
    whatever λ is, so folding RepBN's affine reproduces the eval output exactly. Mid-ramp (``warm`` or ``iter``
    not 0) the trained network still relies on the LayerNorm branch, so that eval model (and its fold) is the one
    SLAB warns about; :meth:`fold_note` says so and ``fold_norms`` records it in the report. SLAB's recipe ends
    by recalibrating: freeze all parameters and update only the RepBN statistics
    (:func:`normlab.surgery.recalibrate_stats`).

    Args:
        num_features: channel count ``C``.
        total_steps: ramp length ``T`` (training forwards / ``decrement_every``). Default ``300000`` (official
            class default; SLAB-Swin/DeiT configs use 60000). Must be less than the total training iterations.
        warmup_steps: pure-norm1 steps before the ramp (official ``warm``). Default ``0`` (LLaMA variant 10000).
        r0: initial λ. Default ``1.0``.
        decrement_every: forwards per counter step. Default ``1``.
        norm1: the per-token norm of the LN branch: a registry key, class or partial. Default ``"layer_norm"``
            (LLaMA variant: ``"rms_norm"``).
        norm1_eps: eps of ``norm1``. Default ``None``: ``1e-6`` (DeiT; SLAB-Swin uses ``1e-5``) for a norm that takes
            an eps; a norm without one (``"dyt"``) needs ``None``.
        channel_dim: must be ``-1``.
        **norm2_kwargs: ``eps``, ``momentum``, ``alpha_init``, ``weight_init``, ``affine``, ``process_group``,
            ``sync_stats`` of the RepBN branch (:class:`RepBatchNorm`, same defaults), available as ``self.norm2``.

    Shape:
        input ``(B, N, C)`` / ``(N, C)``; ``mask`` ``(B, N)`` / ``(N,)`` (RepBN's statistics only). Output: input's
        shape and dtype.

    Example:
        >>> m = PRepBatchNorm(8, total_steps=1000)
        >>> m(torch.randn(2, 5, 8)).shape, m.current_lambda()
        (torch.Size([2, 5, 8]), 0.999)
    """

    def __init__(
        self, num_features: int, *, total_steps: int = 300000, warmup_steps: int = 0, r0: float = 1.0,
        decrement_every: int = 1, norm1: str | Callable[..., nn.Module] = "layer_norm", norm1_eps: float | None = None,
        channel_dim: int = -1, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        **norm2_kwargs: Any,
    ) -> None:
        super().__init__(num_features, channel_dim, "token")
        for name, value, low in (("total_steps", total_steps, 0), ("warmup_steps", warmup_steps, 0),
                                 ("decrement_every", decrement_every, 1)):
            check_int("prep_batch_norm", name, value, low)
        self.total_steps, self.warmup_steps, self.r0 = total_steps, warmup_steps, float(r0)
        self.decrement_every = decrement_every
        self.norm1 = _build_norm1(norm1, num_features, norm1_eps, device=device, dtype=dtype)
        self.norm2 = RepBatchNorm(num_features, device=device, dtype=dtype, **norm2_kwargs)
        schedule = (("warm", warmup_steps), ("iter", total_steps), ("total_step", total_steps), ("num_step", 0))
        for name, value in schedule:
            self.register_buffer(name, torch.tensor(value, dtype=torch.long, device=device))
        self.reset_parameters()

    warm: Tensor
    iter: Tensor
    total_step: Tensor
    num_step: Tensor

    def reset_schedule(self) -> None:
        """Restart the warm phase and the ramp from the constructor's values."""
        self.warm.fill_(self.warmup_steps)
        self.iter.fill_(self.total_steps)
        self.total_step.fill_(self.total_steps)
        self.num_step.zero_()

    def reset_parameters(self) -> None:
        self.reset_schedule()
        super().reset_parameters()

    def current_lambda(self) -> float:
        """λ of the next training forward (1.0 during the warm phase)."""
        return prep_lambda(self.warm, self.iter, self.total_step, self.r0)

    def ramp_finished(self) -> bool:
        return int(self.warm) == 0 and int(self.iter) == 0

    def folded_affine(self) -> FoldedAffine:
        """RepBN's eval affine: exactly what eval computes, mid-ramp included (see :meth:`fold_note`).

        Refused in train mode, where the output is the λ mix with batch statistics.
        """
        if self.training:
            raise RuntimeError(
                f"prep_batch_norm: folded_affine() needs eval mode (running statistics, RepBN only); got train mode "
                f"(next lambda={self.current_lambda():.6g}); call .eval()"
            )
        return self.norm2.folded_affine()

    def fold_note(self) -> str | None:
        """Why a fold of this norm deserves a second look, or ``None``: an unfinished LayerNorm -> RepBN ramp."""
        if self.ramp_finished():
            return None
        return (
            f"LayerNorm -> RepBN ramp unfinished (warm={int(self.warm)}, iter={int(self.iter)} of "
            f"total_step={int(self.total_step)}, next training lambda={self.current_lambda():.6g}): the fold equals "
            "this eval output (RepBN only), but training still mixed in the LayerNorm branch"
        )

    def recalibration_plan(self) -> RecalibrationPlan | None:
        """Held at warm = iter = 0, i.e. λ = 0: the pass runs the RepBN that eval uses (batch statistics), and the
        schedule buffers are put back afterwards, so the LayerNorm -> RepBN ramp continues where it was."""
        plan = bn_recalibration_plan(self.norm2)
        if plan is not None:
            plan.counters = [(self.warm, 0), (self.iter, 0), (self.num_step, 0)]
        return plan

    def batch_stat_view(self) -> BatchStatView | None:
        return self.norm2.batch_stat_view()
