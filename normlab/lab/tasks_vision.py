"""Vision lab tasks: :class:`~normlab.models.resnet.ResNet` on scikit-learn's digits, enlarged to ``image_size``.

* ``digits_resnet``: 10-way classification of the digits (bilinearly enlarged, grey replicated to ``in_channels``).
  Validation: the whole held-out split (loss and accuracy). Its model config (:class:`VisionResNetConfig`) adds
  training-side fields to :class:`~normlab.models.resnet.ResNetConfig`, each applied through the task hooks of the
  training loop (:meth:`Task.parameter_groups`, :meth:`Task.prepare_optimizer`):

  - ``trainable``: ``"all"``; ``"norm_affine"`` (only the norms' γ/β train, every other parameter, the classifier
    included, stays at its random init: Frankle, Schwab, Morcos, ICLR 2021, https://arxiv.org/abs/2003.00152,
    §3); ``"random_match"`` (as many randomly chosen conv-weight entries as there are norm γ/β entries train, the
    rest is frozen: the paper's random-parameter control, §4);
  - ``gamma_init``: ``"default"`` or ``"uniform"`` (the norms' γ ~ U[0, 1], β = 0: the paper's open_lth default);
  - ``agc_clipping``: > 0 attaches Adaptive Gradient Clipping (Brock et al. 2021, §3) with that clipping to every
    parameter but the classifier; 0 = off;
  - ``scalar_lr_factor``: learning-rate factor of one-element parameters (Fixup's scalar biases and multipliers are
    trained at 1/10 of the learning rate in its CIFAR code);
  - ``image_size``: side of the enlarged digits; one value per suite.

  ``norm = "none"`` stands for ``norm=None`` (TOML has no null), as the norm-free variants need.
* ``style_shift``: as ``digits_resnet``, and also evaluated on an appearance-shifted copy of the validation set
  (metrics ``shift_loss``, ``shift_acc``): every image gets a per-channel contrast, colour and brightness change,
  ``x' = a_c · x + b_c`` with ``a_c ~ U[0.3, 0.6]``, ``b_c ~ U[0.2, 0.6]`` drawn per image from a fixed seed, the
  appearance change IBN-Net's instance normalization is meant to absorb (Pan et al., ECCV 2018, §3.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.data.images import REQUIREMENTS as IMAGE_REQUIREMENTS
from normlab.lab.dist import DistInfo, all_reduce_sum
from normlab.lab.tasks import Batch, Task
from normlab.models.resnet import ResNet, ResNetConfig

if TYPE_CHECKING:
    from normlab.lab.config import SuiteConfig

__all__ = ["TRAINABLE", "DigitsResNetTask", "StyleShiftTask", "VisionResNetConfig", "norm_affine_parameters"]

TRAINABLE = ("all", "norm_affine", "random_match")
GAMMA_INITS = ("default", "uniform")


@dataclass
class VisionResNetConfig(ResNetConfig):
    """:class:`~normlab.models.resnet.ResNetConfig` plus the training-side fields of the module docstring."""

    trainable: str = "all"
    gamma_init: str = "default"
    agc_clipping: float = 0.0
    scalar_lr_factor: float = 1.0
    image_size: int = 16

    def __post_init__(self) -> None:
        if self.norm == "none":  # TOML has no null: "none" is the norm-free choice (Fixup, NF)
            self.norm = None
        super().__post_init__()
        if self.trainable not in TRAINABLE:
            raise ValueError(f"VisionResNetConfig: expected trainable in {TRAINABLE}, got {self.trainable!r}")
        if self.gamma_init not in GAMMA_INITS:
            raise ValueError(f"VisionResNetConfig: expected gamma_init in {GAMMA_INITS}, got {self.gamma_init!r}")
        for name in ("agc_clipping", "scalar_lr_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "scalar_lr_factor" and
                                                                                    v == 0):
                want = ">= 0" if name == "agc_clipping" else "> 0"
                raise ValueError(f"VisionResNetConfig: expected {name} to be a number {want}, got {v!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"VisionResNetConfig: expected image_size to be an int >= 8, got {self.image_size!r}")
        if self.trainable != "all" and self.variant != "standard":
            raise ValueError(f"VisionResNetConfig: trainable={self.trainable!r} needs variant='standard' (norm γ/β "
                             f"to train), got variant={self.variant!r}")

    def resnet_config(self) -> ResNetConfig:
        fields = {k: v for k, v in self.to_dict().items() if k in ResNetConfig.__dataclass_fields__}
        return ResNetConfig(**fields)


def norm_affine_parameters(model: nn.Module) -> list[Tensor]:
    """The parameters that belong directly to the model's norm layers (their γ and β)."""
    from normlab.walk import is_norm

    out: list[Tensor] = []
    for module in model.modules():
        if is_norm(module):
            out += list(module.parameters(recurse=False))
    return out


def _freeze_all_but(model: nn.Module, keep: list[Tensor]) -> None:
    ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


def _random_masks(model: nn.Module, count: int) -> list[Tensor]:
    """Leave ``count`` randomly chosen entries of the conv weights trainable (gradient masks; drawn from the global
    RNG, which the training loop seeds with the run's seed); returns the conv weights, all else frozen."""
    convs: list[Tensor] = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    sizes = [int(w.numel()) for w in convs]
    total = sum(sizes)
    if count > total:
        raise ValueError(f"trainable='random_match': {count} norm parameters but only {total} conv weights")
    flat = torch.zeros(total)
    flat[torch.randperm(total)[:count]] = 1.0
    start = 0
    for w, n in zip(convs, sizes):
        mask = flat[start : start + n].view_as(w).to(w.device)
        start += n
        w.register_hook(lambda g, m=mask: g * m)
    _freeze_all_but(model, convs)
    return convs


class DigitsResNetTask(Task):
    """ResNet on the enlarged digits (see the module docstring)."""

    unit = "samples/s"
    eval_metrics: tuple[str, ...] = ("val_loss", "val_acc")
    requirements = IMAGE_REQUIREMENTS
    independent_model_keys = ("norm", "conv", "trainable", "gamma_init")
    config_class = VisionResNetConfig

    def __init__(self, cfg: SuiteConfig, dist: DistInfo, device: torch.device) -> None:
        super().__init__(cfg, dist, device)
        from normlab.data.images import load_digits_split

        model_cfg = VisionResNetConfig.from_dict(cfg.model)
        self.size, self.channels = model_cfg.image_size, model_cfg.in_channels
        data = load_digits_split(val_fraction=cfg.val_fraction)
        self.x_train, self.y_train = self._images(data.x_train), data.y_train
        self._val = self._rank_batches(x=self._images(data.x_val), labels=data.y_val)

    def _images(self, x: Tensor) -> Tensor:
        """``(N, 1, 8, 8)`` in [0, 1] -> ``(N, C, S, S)`` centred at 0 (bilinear enlargement)."""
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x.clamp(0.0, 1.0) - 0.5).expand(-1, self.channels, -1, -1).contiguous()

    @classmethod
    def model_defaults(cls, cfg: SuiteConfig) -> dict[str, Any]:
        return {"in_channels": 3, "num_classes": 10}

    @classmethod
    def arm_problems(cls, cfg: SuiteConfig, model_cfg: Any) -> list[str]:
        size = cfg.model.get("image_size", 16)
        if model_cfg.image_size != size:
            return [f"image_size: the data is shared by all arms; set it in [model] only (suite {size!r}, arm "
                    f"{model_cfg.image_size!r})"]
        return []

    @classmethod
    def build(cls, model_cfg: Any) -> nn.Module:
        model = ResNet(model_cfg.resnet_config())
        model.vision_config = model_cfg  # type: ignore[assignment]  # read by the training hooks below
        if model_cfg.gamma_init == "uniform":
            from normlab.walk import is_norm

            with torch.no_grad():
                for module in model.modules():
                    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
                    if is_norm(module) and isinstance(w, nn.Parameter) and w.dim() == 1:
                        w.uniform_(0.0, 1.0)
                        if isinstance(b, nn.Parameter):
                            b.zero_()
        return model

    @classmethod
    def smoke_batch(cls, cfg: SuiteConfig, model_cfg: Any) -> Batch:
        s = model_cfg.image_size
        return {"x": torch.rand(2, model_cfg.in_channels, s, s) - 0.5, "labels": torch.tensor([0, 1])}

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        vc: VisionResNetConfig = model.vision_config  # type: ignore[assignment]
        if vc.trainable == "norm_affine":
            keep = norm_affine_parameters(model)
            _freeze_all_but(model, keep)
            return [{"params": keep, "weight_decay": 0.0}]
        if vc.trainable == "random_match":
            count = sum(int(p.numel()) for p in norm_affine_parameters(model))
            return [{"params": _random_masks(model, count), "weight_decay": 0.0}]  # decay would move frozen entries
        groups = super().parameter_groups(model, weight_decay)
        if vc.scalar_lr_factor != 1.0:
            scalars = [p for p in model.parameters() if p.numel() == 1]
            ids = {id(p) for p in scalars}
            for g in groups:
                g["params"] = [p for p in g["params"] if id(p) not in ids]
            groups.append({"params": scalars, "weight_decay": 0.0, "lr_scale": vc.scalar_lr_factor})
        return groups

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        vc: VisionResNetConfig = model.vision_config  # type: ignore[assignment]
        if vc.agc_clipping > 0:
            from normlab.weight import agc_parameters, attach_agc

            attach_agc(optimizer, agc_parameters(model), clipping=vc.agc_clipping)

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        return self._draw(rng, batch_size, self.x_train, self.y_train)


def appearance_shift(x: Tensor, seed: int = 0) -> Tensor:
    """Per image and channel ``a_c · (x + 0.5) + b_c - 0.5`` (images centred at 0): lower contrast, a colour cast and
    a brightness offset, drawn from ``seed`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    n, c = x.shape[:2]
    a = torch.empty(n, c, 1, 1).uniform_(0.3, 0.6, generator=g)
    b = torch.empty(n, c, 1, 1).uniform_(0.2, 0.6, generator=g)
    return a * (x + 0.5) + b - 0.5


class StyleShiftTask(DigitsResNetTask):
    """:class:`DigitsResNetTask` also evaluated on the appearance-shifted validation set."""

    eval_metrics = ("val_loss", "val_acc", "shift_loss", "shift_acc")

    def __init__(self, cfg: SuiteConfig, dist: DistInfo, device: torch.device) -> None:
        super().__init__(cfg, dist, device)
        self._shifted = [{"x": appearance_shift(b["x"], seed=i), "labels": b["labels"]}
                         for i, b in enumerate(self._val)]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out = super().evaluate(model)
        was_training = model.training
        model.eval()
        loss_sum = correct = count = 0.0
        try:
            for batch in self._shifted:
                b = self._to_device(batch)
                res = model(**b)
                n = float(b["x"].shape[0])
                loss_sum += float(res.loss) * n
                correct += float((res.logits.argmax(-1) == b["labels"]).sum())
                count += n
        finally:
            model.train(was_training)
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], self.dist, self.device)
        out["shift_loss"] = loss_sum / max(count, 1.0)
        out["shift_acc"] = correct / max(count, 1.0)
        return out
