"""The norm protocol shared by the token norms that divide by a running quadratic mean and subtract no mean:
PowerNorm (Shen et al., https://arxiv.org/abs/2003.07845; ``running_phi``) and Unified Normalization (Yang et al.,
https://arxiv.org/abs/2208.01313; ``running_var``). Both count their training steps in ``iters`` (which drives a
warm-up) and share batch statistics across ranks."""

from __future__ import annotations

from typing import ClassVar, cast

from torch import Tensor, nn

from normlab.nn._base import BatchStatView, FoldedAffine, quadratic_mean_affine

__all__ = ["QuadraticMeanProtocol"]


class QuadraticMeanProtocol:
    """Mixin (before :class:`~normlab.nn._base.NormBase` in the bases): fold, monitored statistics and warm-up restart
    of a norm whose eval form is ``y = γ ⊙ keep(x) / sqrt(running + eps) + β``.

    The class names its running buffer in :attr:`running_stat`; :meth:`_kept` is the per-token module that stays in
    the graph before the per-channel stage (PowerNorm's GroupScaling), ``None`` by default.
    """

    running_stat: ClassVar[str]
    syncs_batch_stats: ClassVar[bool] = True
    eps: float
    channel_dim: int
    iters: Tensor

    def _quadratic_mean(self) -> Tensor:
        return cast(Tensor, getattr(self, self.running_stat))

    def _kept(self) -> nn.Module | None:
        return None

    def restart_warmup(self) -> None:
        """Set ``iters`` to 0 so the warm-up runs again (both official READMEs' advice before fine-tuning a loaded
        checkpoint)."""
        self.iters.zero_()

    def folded_affine(self) -> FoldedAffine:
        """``scale = weight / sqrt(running + eps)``, ``shift = bias`` (float64; no mean term), ``keep`` = :meth:`_kept`
        (it must stay before the folded linear layer)."""
        return quadratic_mean_affine(cast(nn.Module, self), self._quadratic_mean(), keep=self._kept())

    def batch_stat_view(self) -> BatchStatView | None:
        """The quadratic mean of the input (after :meth:`_kept`), no mean row."""
        return BatchStatView(self._quadratic_mean(), None, self.eps, self.channel_dim, self._kept())
