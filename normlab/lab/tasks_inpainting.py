"""The ``inpainting`` lab task: the Region Normalization generator (:class:`~normlab.models.InpaintingGenerator`,
Yu et al. 2020, https://arxiv.org/abs/1911.10375) filling holes in crops of scikit-learn's two sample photographs.

* Data (:mod:`normlab.data.inpainting`): each photograph split by region (its left ``1 - val_fraction`` of the
  columns for training, the rest for validation; no pixel in both). Training draws :attr:`InpaintingTask.patch_size`
  crops at random positions with fresh masks (half rectangles, half free-form strokes), both from the step's seeded
  generator. Validation: the non-overlapping crops of the validation regions (130 at 32×32 and the default 0.25),
  in an order shuffled by seed 0 (each evaluation batch mixes both photographs, as training batches do), each
  with a mask fixed by seed 0, the same for every arm and seed.
* Loss: the paper's reconstruction term, ``L1(output, image) / mean(mask)``. Left out: the adversarial term
  (nsgan, with its discriminator) that the paper trains with, and no perceptual or style loss — so the comparison
  is of norms under a pure L1 objective, which favours blurry fills and is what PSNR rewards.
* Metrics (eval mode, on the composite ``output·M + image·(1 − M)``, as inpainting papers report): ``val_loss`` (the
  training loss), ``val_psnr`` (dB, per image over the whole image with peak 1, averaged over images), ``val_l1``
  (mean absolute error over the whole image), and the hole-only ``val_psnr_hole`` and ``val_l1_hole`` (over the
  hole pixels alone, per image, averaged). Claims use them as ``final_val_psnr`` etc.

Evaluation runs the validation set in batches of ``eval_batch_size``: RN-B/RN-L use batch statistics also in eval
mode (the released code's "BN-style" statistics), so their validation numbers depend on that batch composition,
which is the same for every arm and seed. (Unshuffled, each batch held one photograph, and RN's validation PSNR
was about 9 dB lower than with mixed batches like those it trained on, at 200 steps: the sensitivity to a shift
in the data that its authors note for the released "BN-style" statistics.)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from normlab.data.inpainting import REQUIREMENTS
from normlab.lab.dist import DistInfo, all_reduce_sum
from normlab.lab.tasks import Batch, Task
from normlab.models.inpainting import InpaintingConfig, InpaintingGenerator

if TYPE_CHECKING:
    from normlab.lab.config import SuiteConfig

__all__ = ["InpaintingTask", "inpainting_metrics"]

_METRICS = ("val_psnr", "val_l1", "val_psnr_hole", "val_l1_hole")


def inpainting_metrics(output: Tensor, image: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Per-image values of the composite's PSNR and L1 over the whole image and over the hole (see the module
    docstring), each a ``(N,)`` tensor; PSNR is capped at 100 dB (an exact fill)."""
    m = mask.expand_as(image)
    comp = output * m + image * (1.0 - m)
    err = comp - image
    pixels = float(image[0].numel())
    hole = m.sum(dim=(1, 2, 3)).clamp_min(1.0)
    mse_full = err.square().sum(dim=(1, 2, 3)) / pixels
    mse_hole = err.square().sum(dim=(1, 2, 3)) / hole
    return {
        "val_psnr": _psnr(mse_full),
        "val_l1": err.abs().sum(dim=(1, 2, 3)) / pixels,
        "val_psnr_hole": _psnr(mse_hole),
        "val_l1_hole": err.abs().sum(dim=(1, 2, 3)) / hole,
    }


def _psnr(mse: Tensor) -> Tensor:
    return (-10.0 * torch.log10(mse.clamp_min(1e-10))).clamp(max=100.0)


class InpaintingTask(Task):
    """The RN generator on masked crops of the sample photographs (see the module docstring)."""

    unit = "samples/s"
    eval_metrics = ("val_loss", *_METRICS)
    higher_is_better = ("val_psnr", "val_psnr_hole")
    requirements = REQUIREMENTS
    independent_model_keys = ("norm", "later_norm")
    patch_size = 32
    config_class = InpaintingConfig
    model_class = InpaintingGenerator

    def __init__(self, cfg: SuiteConfig, dist: DistInfo, device: torch.device) -> None:
        super().__init__(cfg, dist, device)
        from normlab.data.inpainting import load_inpainting_split

        self.data = load_inpainting_split(self.patch_size, train_fraction=1.0 - cfg.val_fraction)
        self._val = self._rank_batches(image=self.data.val_images, mask=self.data.val_masks)

    @classmethod
    def suite_problems(cls, cfg: SuiteConfig) -> list[str]:
        # Each photograph's validation region must hold at least one crop (427x640 images).
        if 640 * cfg.val_fraction < cls.patch_size or 640 * (1 - cfg.val_fraction) < cls.patch_size:
            return [f"val_fraction: {cfg.val_fraction!r} leaves a region narrower than a {cls.patch_size}-pixel crop"]
        return []

    @classmethod
    def smoke_batch(cls, cfg: SuiteConfig, model_cfg: Any) -> Batch:
        s = cls.patch_size
        image, mask = torch.rand(2, model_cfg.in_channels, s, s), torch.zeros(2, 1, s, s)
        mask[:, :, s // 4 : s // 2, s // 4 : s // 2] = 1.0
        return {"image": image, "mask": mask, "target": image}

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        from normlab.data.inpainting import random_crops, random_masks

        image = random_crops(rng, self.data.train, batch_size, self.patch_size)
        mask = random_masks(rng, batch_size, self.patch_size)
        return {"image": image.to(self.device), "mask": mask.to(self.device)}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        out = model(batch["image"], batch["mask"], target=batch["image"])
        return out.loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``val_loss`` and the PSNR / L1 metrics over the validation set, in eval mode, reduced over ranks."""
        was_training = model.training
        model.eval()
        sums = dict.fromkeys(self.eval_metrics, 0.0)
        count = 0.0
        try:
            for batch in self._eval_batches():
                out = model(batch["image"], batch["mask"], target=batch["image"])
                n = float(batch["image"].shape[0])
                sums["val_loss"] += float(out.loss) * n
                for k, v in inpainting_metrics(out.image, batch["image"], batch["mask"]).items():
                    sums[k] += float(v.sum())
                count += n
        finally:
            model.train(was_training)
        names = list(sums)
        reduced = all_reduce_sum([sums[k] for k in names] + [count], self.dist, self.device)
        total = max(reduced[-1], 1.0)
        out_metrics = {k: v / total for k, v in zip(names, reduced[:-1])}
        if not all(math.isfinite(v) for v in out_metrics.values()):
            out_metrics["val_loss"] = math.inf
        return out_metrics
