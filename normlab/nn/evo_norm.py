"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan, Le, "Evolving Normalization-Activation Layers", NeurIPS 2020,
https://arxiv.org/abs/2004.02967): layers that replace the pair BatchNorm + ReLU in pre-activation ResNets.

Defaults are the official TensorFlow code's (``tensorflow/tpu``, ``resnet_model.py``): eps ``1e-5``, biased
variances, B0's running variance moved by ``0.1`` with no Bessel correction, S0's group count the largest divisor of
``C`` that is at most 32. timm's port (eps ``1e-3`` for B0, Bessel-corrected running variance) is
``EvoNormB0(C, eps=1e-3, bessel=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional.evo_norm import evo_norm_b0, evo_norm_s0
from normlab.nn._base import BatchStatView, NormBase, RecalibrationPlan, check_unit
from normlab.nn.group_norm import resolve_num_groups
from normlab.registry import Paper, register_norm

__all__ = ["EvoNormB0", "EvoNormS0"]

_PAPER = Paper("Evolving Normalization-Activation Layers", "https://arxiv.org/abs/2004.02967")


def _centred(x: Tensor) -> Tensor:
    """``x`` minus its per-channel batch mean: the quadratic mean of this is B0's (biased) batch variance."""
    return x - x.mean([d for d in range(x.dim()) if d != 1], keepdim=True)


class _EvoNorm(NormBase):
    """What B0 and S0 share: the learnt per-channel ``v`` (init 1) beside the affine, and no padding mask (their
    statistics pool over positions)."""

    rejects_mask = True

    def _init_v_affine(self, affine: bool, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        self.v = torch.nn.Parameter(torch.empty(self.num_features, device=device, dtype=dtype))
        self._init_affine(self.num_features, weight=affine, bias=affine, device=device, dtype=dtype)

    def _param_init(self) -> dict[str, float]:
        return {"v": 1.0, "weight": 1.0, "bias": 0.0}


@register_norm(
    "evo_norm_b0", functional=evo_norm_b0, layout="channel_first",
    has_running_stats=True, batch_dependent=True, foldable=False,
    aliases=("evonorm_b0", "evonormb0"),
    paper=_PAPER,
    samples=({"bessel": True, "eps": 1e-3}, {"affine": False}),
    description="x / max(batch std, v*x + instance std), affine; running batch variance at eval",
)
class EvoNormB0(_EvoNorm):
    r"""EvoNorm-B0: a batch-dependent normalization-activation layer with a running variance.

    Paper: Liu, Brock, Simonyan, Le, https://arxiv.org/abs/2004.02967 (Table 1, B0).

    .. math:: y = \frac{x}{\max\left(\sqrt{s^2_c + \epsilon},\; v_c x + \sqrt{t^2_{n,c} + \epsilon}\right)}
              \gamma_c + \beta_c

    ``s²`` is the biased variance of channel ``c`` over the batch and all positions ``(N, *)`` in training, the
    running variance ``running_var`` in eval mode; ``t²`` is the biased variance of ``x[n, c]`` over its positions,
    taken from the current sample in both modes (so eval is per-sample, not batch-dependent). There is no mean and
    no running mean: B0 never centres. In training ``running_var ← (1 − momentum)·running_var + momentum·s²``
    (TF: ``decay = 0.9``, no Bessel correction; ``bessel=True`` multiplies ``s²`` by ``n/(n−1)``, ``n = N·|*|``,
    as timm's port does).

    Not foldable: the instance term ``v·x + sqrt(t² + eps)`` depends on each sample, so even in eval mode the layer
    is no per-channel affine (only ``γ``, ``β`` could merge into a following linear op).

    Args:
        num_features: channel count ``C``.
        eps: added to both variances inside the roots. Default ``1e-5`` (TF; timm uses ``1e-3``).
        momentum: EMA factor of ``running_var``. Default ``0.1`` (TF's decay 0.9).
        bessel: correct the running variance by ``n/(n−1)`` (timm). Default ``False`` (TF).
        affine: learn ``weight`` (γ, init 1) and ``bias`` (β, init 0). Default ``True``. ``v`` (init 1) is always
            learnt.
        channel_dim: must be ``1``.

    Shape:
        input ``(N, C, *)`` (channels-last accepted); output the same shape and dtype (float16/bfloat16 inputs are
        computed in float32).

    Example:
        >>> m = EvoNormB0(1)
        >>> m(torch.tensor([[[1.0, 3.0]], [[-1.0, 1.0]]])).detach().flatten()  # the spec's hand-checked vector
        tensor([ 0.5000,  0.7500, -0.7071,  0.5000])
    """

    def __init__(
        self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1, bessel: bool = False, affine: bool = True,
        channel_dim: int = 1, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, channel_dim, "channel_first")
        self.eps, self.bessel = eps, bessel
        self.momentum = check_unit("evo_norm_b0", "momentum", momentum)
        self._init_v_affine(affine, device, dtype)
        self._init_stats([("running_var", (num_features,), 1.0)], device=device, dtype=dtype)
        self.reset_parameters()

    running_var: Tensor

    def recalibration_plan(self) -> RecalibrationPlan | None:
        """``momentum = 1`` makes the update ``running_var ← s²`` (times ``n/(n−1)`` with ``bessel``)."""
        return RecalibrationPlan([(self.running_var, 1.0)], overrides=[(self, "momentum", 1.0)])

    def batch_stat_view(self) -> BatchStatView | None:
        """``running_var`` against the batch's biased variance: the quadratic mean of the per-channel centred input
        (B0 keeps no running mean, so there is no mean row)."""
        return BatchStatView(self.running_var, None, float(self.eps), 1, transform=_centred)


@register_norm(
    "evo_norm_s0", functional=evo_norm_s0, layout="channel_first", aliases=("evonorm_s0", "evonorms0"),
    paper=_PAPER,
    samples=({"num_groups": 2}, {"num_groups": 1, "affine": False}),
    description="x * sigmoid(v*x) / group std, affine; per sample, no state",
)
class EvoNormS0(_EvoNorm):
    r"""EvoNorm-S0: a batch-independent normalization-activation layer (group std and a SiLU-like gate).

    Paper: Liu, Brock, Simonyan, Le, https://arxiv.org/abs/2004.02967 (Table 1, S0).

    .. math:: y = \frac{x \cdot \mathrm{sigmoid}(v_c x)}{\sqrt{\sigma^2_{n,g(c)} + \epsilon}} \gamma_c + \beta_c

    ``σ²`` is the biased variance of ``x`` (before the gate) over the ``C/G`` channels of group ``g`` and all
    positions, per sample. No state: train and eval are identical. Not foldable (the group std depends on the
    sample).

    Args:
        num_features: channel count ``C``.
        num_groups: group count ``G``; must divide ``C``. Default ``None``: the largest divisor of ``C`` that is at
            most 32 (the official TF code's fallback; timm instead refuses a ``C`` that 32 does not divide).
        eps: added to the group variance. Default ``1e-5`` (TF and timm's S0; timm's S0a uses ``1e-3``).
        affine: learn ``weight`` (γ, init 1) and ``bias`` (β, init 0). Default ``True``. ``v`` (init 1) is always
            learnt.
        channel_dim: must be ``1``.

    Shape:
        input ``(N, C, *)`` (channels-last accepted); output the same shape and dtype.

    Example:
        >>> m = EvoNormS0(2, num_groups=1)
        >>> m(torch.tensor([[[[1.0, -1.0]], [[2.0, 0.0]]]])).detach().flatten()  # the spec's hand-checked vector
        tensor([ 0.6539, -0.2405,  1.5756,  0.0000])
    """

    def __init__(
        self, num_features: int, *, num_groups: int | None = None, eps: float = 1e-5, affine: bool = True,
        channel_dim: int = 1, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, channel_dim, "channel_first")
        self.num_groups = resolve_num_groups(num_groups, num_features, "evo_norm_s0")
        self.eps = eps
        self._init_v_affine(affine, device, dtype)
        self.reset_parameters()

    repr_always = ("num_groups",)
