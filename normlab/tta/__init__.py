"""Test-time adaptation (TTA) of a model's norms: ``adapt(model, method, **options) -> Adapted``.

Methods (defaults are those of the official codes):

* ``"source"``: the model as trained, in eval mode (running statistics).
* ``"tbn"``: test-batch statistics (Nado et al. 2020, https://arxiv.org/abs/2006.10963; Schneider et al. 2020,
  https://arxiv.org/abs/2006.16971; the ``norm`` baseline of Tent): every batch-dependent norm with running
  statistics runs its training-mode forward on the test batch.
* ``"alpha_bn"``: α-BN (You, Li, Zhao 2021, https://arxiv.org/abs/2110.04065): normalize with
  ``(1-α)·source + α·test`` statistics; α weights the *test* statistics (default 0.1) and the test variance is the
  unbiased one, as the benchmark's ``AlphaBatchNorm``.
* ``"tent"``: Tent (Wang et al., ICLR 2021, https://arxiv.org/abs/2006.10726): one Adam step per batch (lr 1e-3) on
  the norms' affine parameters minimizing the prediction entropy; online; the returned predictions are from the
  forward that gave the loss (before the step).
* ``"unmix_tns"``: UnMix-TNS (Tomar et al., ICLR 2024, https://arxiv.org/abs/2401.08328): K = 16 statistic
  components, instance-level un-mixing (τ = 0.07), online component updates.
* ``"rotta_rbn"``: RoTTA's robust BN (Yuan et al., CVPR 2023, https://arxiv.org/abs/2303.13899): an EMA of the batch
  statistics (momentum 0.05) from the source ones, used for normalization.

Which layers. Every official code finds its layers with ``isinstance(m, nn.BatchNorm2d)`` and skips everything else
without a word. normlab walks the model with :func:`~normlab.walk.iter_norms` and decides by traits and the norm
protocol, and :attr:`Adapted.report` says, per norm, what was done or why it was skipped:

* TBN: batch-dependent norms with running statistics (``batch_dependent`` and ``has_running_stats`` traits, and
  running buffers present): normlab ``BatchNorm`` on channel-first ``(N, C, *)`` and token ``(B, N, C)`` inputs
  (padding masks respected), RepBN and the other batch-statistic norms, ``torch.nn.BatchNorm1d/2d/3d`` and every
  class of the adapter table (:data:`normlab.walk.ADAPTERS`).
* α-BN, UnMix-TNS, RBN: the same, restricted to norms whose eval form is exactly
  ``weight·(x - running_mean)/sqrt(running_var + eps) + bias`` (checked against the norm's ``folded_affine()``),
  because these methods normalize with statistics of their own; RepBN (an extra ``αx``) and norms whose running
  statistic is a second moment (PowerNorm, UnifiedNorm) are skipped with that reason.
* Tent: every norm with a parameter named ``weight`` or ``bias`` (BatchNorm of any layout, GroupNorm, LayerNorm,
  RMSNorm of a ViT, ...); batch-dependent norms also normalize with the test batch's statistics.

1-d and token batch norms, against the official codes (which patch ``BatchNorm2d`` only):

* Tent and its ``norm`` (TBN) baseline leave a ``BatchNorm1d`` (a classifier head, a token BN) in eval mode on the
  source statistics; normlab adapts it like any batch-dependent norm, its statistics taken over every axis but the
  channel axis (the batch for ``(N, C)``, batch and length for ``(N, C, L)``, batch and valid tokens for a token
  BatchNorm). UnMix-TNS's TBN variant re-activates ``BatchNorm1d`` only for batches of more than one sample and
  silently keeps source statistics otherwise; normlab raises a ``ValueError`` for any batch that leaves a single
  value per channel (a one-image batch of a conv net is fine: its statistics are spatial, as in the official code).
* α-BN's ``AlphaBatchNorm`` is written for ``BatchNorm2d``; normlab mixes the statistics of every axis but the
  channel axis, so 1-d, 3-d and token batch norms are treated alike.
* UnMix-TNS replaces ``BatchNorm2d`` and puts a source-statistics layer in place of ``BatchNorm1d``. normlab takes the
  instance statistics over every axis but batch and channel (the length of ``(N, C, L)``, the valid tokens of a
  token BatchNorm); an input with no such axis (``(N, C)``) has no instance statistics and is normalized with the
  source statistics, as the official ``BatchNorm1d`` replacement does.
* RoTTA replaces ``BatchNorm1d`` and ``BatchNorm2d`` alike; so does normlab, for every layout.
* Tent trains only ``BatchNorm2d``'s affine; normlab trains the affine of every norm it finds. The official code
  also calls ``model.train()``, which turns dropout on; normlab keeps the rest of the model in eval mode unless
  ``model_train=True`` (identical on nets without dropout, such as the WRN and ResNets of the benchmarks).

Safety: ``adapt`` works on a deep copy unless ``inplace=True``; ``reset()`` restores the source state bitwise
(parameters, buffers, the methods' own state, the optimizer's state); a method with nothing to adapt (Tent on a
model with no affine parameter) raises a ``ValueError`` that lists the model's norms and why each was skipped; an
empty batch raises a ``ValueError``.

On a stream of :func:`normlab.data.streams.make_stream`, :func:`run_stream` predicts every batch once and resets
where the stream says so; :class:`StreamResult` gives the error per domain and their mean.

Example:
    >>> import torch
    >>> from normlab.models import CNNConfig, DigitsCNN
    >>> tta = adapt(DigitsCNN(CNNConfig(channels=[8, 8])), "tent")
    >>> logits = tta(torch.rand(16, 1, 8, 8))  # predictions, then one entropy step
    >>> tta.reset()                             # back to the source model
"""

from __future__ import annotations

from normlab.tta._common import LayerChoice
from normlab.tta.adapted import METHOD_DEFAULTS, METHODS, Adapted, adapt, plan
from normlab.tta.evaluate import StreamResult, run_stream
from normlab.tta.tent import softmax_entropy

__all__ = [
    "METHODS",
    "METHOD_DEFAULTS",
    "Adapted",
    "LayerChoice",
    "StreamResult",
    "adapt",
    "plan",
    "run_stream",
    "softmax_entropy",
]
