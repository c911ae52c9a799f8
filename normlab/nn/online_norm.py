"""Online Normalization (Chiley et al., "Online Normalization for Training Neural Networks", NeurIPS 2019,
https://arxiv.org/abs/1905.05894): batch-size-independent normalization with streaming statistics and a custom
backward pass driven by streaming control processes."""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional.online_norm import ECMS, online_norm
from normlab.nn._base import NormBase, RecalibrationPlan, check_unit
from normlab.registry import Paper, register_norm

__all__ = ["OnlineNorm"]


@register_norm(
    "online_norm", functional=online_norm, layout="channel_first",
    has_running_stats=True, batch_dependent=False, foldable=False, custom_backward=True,
    aliases=("onlinenorm", "on"),
    paper=Paper("Online Normalization for Training Neural Networks", "https://arxiv.org/abs/1905.05894"),
    samples=({"ecm": "ls"}, {"ecm": None, "alpha_fwd": 0.5, "alpha_bkw": 0.75}, {"affine": False}),
    description="streaming (per-sample EMA) statistics forward, control processes backward; batch size 1 works",
)
class OnlineNorm(NormBase):
    r"""Online Normalization: each sample normalised with streaming statistics of the samples before it.

    Paper: Chiley et al., https://arxiv.org/abs/1905.05894 (Eq. 9-11, Algorithm 1); defaults of the official
    PyTorch module (``Cerebras/online-normalization``).

    Training treats the batch as a stream ``t = 1..N`` in batch order. Per channel, with the sample's spatial mean
    ``m_t`` and biased variance ``q_t``:

    .. math:: y_t = \frac{x_t - \mu_{t-1}}{\sqrt{\sigma^2_{t-1} + \epsilon}}, \quad
              \sigma^2_t = \alpha_f \sigma^2_{t-1} + (1-\alpha_f) q_t + \alpha_f (1-\alpha_f)(m_t - \mu_{t-1})^2,
              \quad \mu_t = \mu_{t-1} + (1-\alpha_f)(m_t - \mu_{t-1})

    (``running_mean`` = μ, ``running_var`` = σ², updated in place). The backward pass does not differentiate
    through the statistics; instead, per sample in the same order, with ``δ_t`` the gradient at ``y_t``:
    ``δ'_t = δ_t − (1 − α_b)·v·y_t``, ``v ← v + mean(δ'_t·y_t)``, ``∂x_t = δ'_t / s_t − (1 − α_b)·u``,
    ``u ← u + mean(∂x_t)`` (means over positions; ``u``, ``v`` are the buffers ``control_u``, ``control_v``, updated
    in place by every backward). Then the affine and the error-compensation module ``ecm`` (ordinary autograd).

    Eval: ``y = (x − μ)/sqrt(σ² + ε)`` with the final streams, then the affine and the ECM.

    Traits: ``batch_dependent=False`` - batch size plays no role (a batch of ``N`` is ``N`` batches of one; a sample
    depends on earlier samples only through the streams, as it would on earlier steps), so batch size 1 trains;
    ``custom_backward=True``; not foldable (the ECM follows the affine: clamping or the per-sample layer scaling).
    There is no pure batch statistic to re-estimate, so :meth:`recalibration_plan` returns ``None`` (and
    :func:`~normlab.surgery.recalibrate_stats` does not select this norm); run training-mode forwards to refresh
    the streams. ``saturates_inf`` holds for the default ``ecm="ac"`` (the clamp maps ±inf to ±5).

    Args:
        num_features: channel count ``C``.
        alpha_fwd: ``α_f``, decay of the forward streams. Default ``0.999`` (CIFAR-10 experiments: 1023/1024).
        alpha_bkw: ``α_b``, decay of the control processes. Default ``0.99`` (CIFAR-10 experiments: 127/128).
        eps: inside the root of the normalization and of layer scaling. Default ``1e-5``.
        affine: learn ``weight`` (init 1) and ``bias`` (init 0). Default ``True``.
        ecm: ``"ac"`` (default, the official module's: clamp to ``[−5, 5]``), ``"ls"`` (layer scaling, the
            experiment scripts' choice) or ``None``.
        channel_dim: must be ``1``.

    Shape:
        input ``(N, C, *)`` (channels-last accepted); output the same shape and dtype.

    Example:
        >>> m = OnlineNorm(1, alpha_fwd=0.5, eps=0.0, ecm=None)
        >>> m(torch.tensor([[[1.0, 3.0]], [[0.0, 2.0]]])).detach().flatten()  # the spec's hand-checked vector
        tensor([ 1.0000,  3.0000, -0.7071,  0.7071])
        >>> m.running_mean, m.running_var
        (tensor([1.]), tensor([1.5000]))
    """

    def __init__(
        self, num_features: int, *, alpha_fwd: float = 0.999, alpha_bkw: float = 0.99, eps: float = 1e-5,
        affine: bool = True, ecm: str | None = "ac", channel_dim: int = 1, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, channel_dim, "channel_first")
        if ecm not in ECMS:
            raise ValueError(f"online_norm: expected ecm in {ECMS}, got {ecm!r}")
        self.alpha_fwd = check_unit("online_norm", "alpha_fwd", alpha_fwd)
        self.alpha_bkw = check_unit("online_norm", "alpha_bkw", alpha_bkw)
        self.eps, self.ecm = eps, ecm
        self._init_affine(num_features, weight=affine, bias=affine, device=device, dtype=dtype)
        c = (num_features,)
        self._init_stats([("running_mean", c, 0.0), ("running_var", c, 1.0), ("control_u", c, 0.0),
                          ("control_v", c, 0.0)], device=device, dtype=dtype)
        self.reset_parameters()

    running_mean: Tensor
    running_var: Tensor
    control_u: Tensor
    control_v: Tensor
    saturates_inf = True  # with the default ecm="ac"
    rejects_mask = True

    def recalibration_plan(self) -> RecalibrationPlan | None:
        """``None``: the streams are per-sample EMAs, not batch statistics a pass could write (see the class)."""
        return None
