"""PowerNorm (Shen, Yao, Gholami, Mahoney, Keutzer, "PowerNorm: Rethinking Batch Normalization in Transformers",
ICML 2020, https://arxiv.org/abs/2003.07845), with the semantics of the official ``MaskPowerNorm``
(sIncerass/powernorm @ 9ea6226a) as the default, and the parameter-free per-token ``GroupScaling`` it applies first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normlab.functional.power_norm import BackwardDivisor, group_scaling, power_norm
from normlab.kernels._scope import Impl
from normlab.nn._base import NormBase, RecalibrationPlan, check_int, check_unit
from normlab.nn._quadratic_mean import QuadraticMeanProtocol
from normlab.registry import Paper, register_norm

__all__ = ["GroupScaling", "PowerNorm"]

_PAPER = Paper("PowerNorm: Rethinking Batch Normalization in Transformers", "https://arxiv.org/abs/2003.07845")


class GroupScaling(nn.Module):
    r"""Per-token group RMS scaling (PowerNorm's first stage): :math:`x_g / \sqrt{\mathrm{mean}(x_g^2) + \epsilon}`
    over each group ``g`` of ``C / group_num`` consecutive channels. No parameters; it stays in the graph when the
    PowerNorm's per-channel stage is folded into a linear layer.

    Args:
        group_num: number of channel groups (the official NMT models use the number of attention heads).
        eps: fixed at ``1e-5`` in the official code.

    Example:
        >>> GroupScaling(2)(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        tensor([[0.6325, 1.2649, 0.8485, 1.1314]])
    """

    def __init__(self, group_num: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        self.group_num = group_num
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            return group_scaling(x.float(), self.group_num, self.eps).to(x.dtype)
        return group_scaling(x, self.group_num, self.eps)

    def extra_repr(self) -> str:
        return f"group_num={self.group_num}, eps={self.eps}"


@register_norm(
    "power_norm", functional=power_norm, layout="token",
    has_running_stats=True, batch_dependent=True, foldable=True, custom_backward=True,
    paper=_PAPER,
    aliases=("pn", "mask_power_norm", "powernorm"),
    samples=(
        {"group_num": 2},
        {"group_num": None},
        {"warmup_iters": 0},
        {"backward_divisor": "forward"},
        {"affine": False},
    ),
    description="relaxed zero-mean batch norm: GroupScaling + running quadratic mean, approximate backward",
)
class PowerNorm(QuadraticMeanProtocol, NormBase):
    r"""PowerNorm for Transformer token tensors, official ``MaskPowerNorm`` semantics, with padding masks.

    Paper: Shen et al., ICML 2020, https://arxiv.org/abs/2003.07845.

    Each token is first group-RMS scaled (:class:`GroupScaling`, ``x̂``). Then, per channel ``c``, with the
    quadratic mean :math:`\psi_B^2 = \mathrm{mean}_{t \in valid}\, \hat x_{t,c}^2` of the valid tokens and the
    1-based step ``t = iters + 1``:

    .. math:: y = \gamma \odot \hat x / \sqrt{s + \epsilon} + \beta, \quad
              s = \psi_B^2 \text{ if } t \le \text{warmup\_iters} \text{ else } \phi_{t-1}

    The running quadratic mean ``running_phi`` (φ) is updated after use: a cumulative-average step while
    ``t < warmup_iters``, then always the EMA ``φ ← α_f φ + (1-α_f) ψ_B²``. No mean is subtracted.
    Eval: ``y = γ ⊙ GroupScaling(x) / sqrt(running_phi + eps) + β`` (the per-channel stage folds; GroupScaling stays).

    Backward (training; the official approximate recursion, not the exact gradient): with ``g = γ ⊙ dY`` and
    ``u = ema_gz``: ``g̃ = g − (1−α_b) u ⊙ z``; ``u ← u + mean_{all positions} g̃ ⊙ z`` (padding included);
    ``dx̂ = g̃ / sqrt(ψ_B² + eps)``; ``dγ = Σ dY ⊙ z``. The gradient then flows through GroupScaling by autograd.

    Where the paper and the official code differ, the default follows the code; switches:

    * ``backward_divisor="batch"`` (code: divides by ψ_B even after warm-up) or ``"forward"`` (paper: divides by
      the statistic the forward used, ψ_{t-1} after warm-up).
    * ``group_num=None`` drops GroupScaling (the paper's plain PN; users report NaNs without it, issues #9, #15).
    * ``affine`` is honoured (the official class ignores it).

    ``iters`` counts train-mode forward calls. Under an initialised ``torch.distributed`` the statistics and the
    backward's gradient average are all-reduced over ``process_group`` (the official code keeps them per rank).

    Args:
        num_features: channel count ``C``.
        eps: inside the root. Default ``1e-5``.
        alpha_fwd: EMA weight of the old ``running_phi``. Default ``0.9``.
        alpha_bkw: backward EMA factor. Default ``0.9``.
        warmup_iters: steps that normalize by the batch statistic. Default ``10000`` (official class default;
            the NMT scripts pass the LR warm-up, 8000).
        group_num: GroupScaling groups (``C % group_num == 0``), or ``None`` for none. Default ``1``.
        affine: learn ``weight`` (init 1) and ``bias`` (init 0). Default ``True``.
        backward_divisor: ``"batch"`` (code) or ``"forward"`` (paper), see above.
        channel_dim: must be ``-1``.
        process_group: ``torch.distributed`` group to sync over (``None`` = WORLD). ``sync_stats=False`` opts out.
        impl: ``"auto"`` (default), ``"composite"`` or ``"cpu"``: the training step runs fused kernels unless
            ``"composite"`` (:func:`normlab.kernels.use_impl` sets it for a scope).

    Shape:
        input ``(B, N, C)`` or ``(N, C)`` (any ``(*, C)``); ``mask`` ``(B, N)`` / ``(N,)``, True/1 = valid token.
        Output: the input's shape and dtype; float16/bfloat16 statistics are computed in float32.

    Example:
        >>> pn = PowerNorm(8, group_num=2)
        >>> x, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
        >>> pn(x, mask=mask).shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self, num_features: int, *, eps: float = 1e-5, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9,
        warmup_iters: int = 10000, group_num: int | None = 1, affine: bool = True,
        backward_divisor: BackwardDivisor = "batch", channel_dim: int = -1, process_group: Any = None,
        sync_stats: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        impl: Impl = "auto",
    ) -> None:
        super().__init__(num_features, channel_dim, "token", impl=impl)
        op = "power_norm"
        if group_num is not None and (
            isinstance(group_num, bool) or not isinstance(group_num, int) or group_num < 1 or num_features % group_num
        ):
            raise ValueError(
                f"{op}: expected group_num to be None or a positive divisor of num_features={num_features}, "
                f"got {group_num!r}"
            )
        if backward_divisor not in ("batch", "forward"):
            raise ValueError(f"{op}: expected backward_divisor 'batch' or 'forward', got {backward_divisor!r}")
        self.eps, self.alpha_fwd = eps, check_unit(op, "alpha_fwd", alpha_fwd)
        self.alpha_bkw = check_unit(op, "alpha_bkw", alpha_bkw)
        self.warmup_iters = check_int(op, "warmup_iters", warmup_iters)
        self.group_num = group_num
        self.backward_divisor: BackwardDivisor = backward_divisor
        self.process_group, self.sync_stats = process_group, sync_stats
        self.group_scaling = GroupScaling(group_num) if group_num is not None else None
        self._init_affine(num_features, weight=affine, bias=affine, device=device, dtype=dtype)
        C = (num_features,)  # noqa: N806
        self._init_stats([("running_phi", C, 1.0), ("ema_gz", C, 0.0), ("iters", (), 0)], device=device, dtype=dtype)
        self.reset_parameters()

    kernel_op = "power_norm"

    running_phi: Tensor
    ema_gz: Tensor
    iters: Tensor
    running_stat = "running_phi"

    def _functional_arg(self, name: str) -> Any:
        if name == "group_scaling_eps":  # GroupScaling's fixed eps (the functional's default)
            return self.group_scaling.eps if self.group_scaling is not None else GroupScaling().eps
        return super()._functional_arg(name)

    def _kept(self) -> nn.Module | None:
        """GroupScaling stays before the folded per-channel stage (``None`` when ``group_num=None``)."""
        return self.group_scaling

    def recalibration_plan(self) -> RecalibrationPlan | None:
        """Step t = 1 <= warmup_iters: normalise by the batch quadratic mean; alpha_fwd = 0 makes the update
        ``running_phi <- batch quadratic mean`` (of the group-scaled input, over valid tokens, synced across ranks)."""
        return RecalibrationPlan(
            [(self.running_phi, 1.0)], overrides=[(self, "alpha_fwd", 0.0), (self, "warmup_iters", 1)],
            counters=[(self.iters, 0)], keep=[self.ema_gz],
        )

    def _upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int | None) -> None:
        # The official MaskPowerNorm stores running_phi / ema_gz as (1, C, 1, 1); accept those checkpoints.
        for key in ("running_phi", "ema_gz"):
            t = state_dict.get(prefix + key)
            if isinstance(t, Tensor) and t.dim() == 4 and t.numel() == self.num_features:
                state_dict[prefix + key] = t.reshape(self.num_features)
