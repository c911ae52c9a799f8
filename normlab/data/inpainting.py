"""Inpainting data from scikit-learn's two sample photographs (``china.jpg``, ``flower.jpg``, 427×640 RGB; no
download): random crops, a fixed validation set, and seeded hole masks (rectangles and free-form strokes).

Split by region, so that no validation pixel is ever seen in training: in each photograph the columns left of
``train_fraction · W`` are the training region, the rest the validation region, and a crop never crosses the line.
Both photographs are in both splits (the same two scenes, disjoint pixels).

Masks are ``(N, 1, S, S)`` float tensors, **1 = hole**, drawn from a ``numpy`` generator: a rectangle with sides in
``[S/4, S/2]``, or free-form strokes (a few random walks of a round brush, as in the free-form masks of Yu et al.
2019, https://arxiv.org/abs/1806.03589, at a small size), half each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from normlab.data._cache import Requirement, require

__all__ = ["REQUIREMENTS", "InpaintingSplit", "load_inpainting_split", "random_crops", "random_masks"]

_SKLEARN = Requirement(module="sklearn", distribution="scikit-learn", extra="data")
REQUIREMENTS: tuple[Requirement, ...] = (_SKLEARN,)


@dataclass(frozen=True)
class InpaintingSplit:
    """The training regions of the two photographs and a fixed validation set.

    Attributes:
        train: the training regions, each ``(3, H, W_train)`` float32 in ``[0, 1]``.
        val_images: ``(N_val, 3, S, S)``: the non-overlapping crops of the validation regions, in an order shuffled
            with the split's seed (so that every slice mixes both photographs).
        val_masks: ``(N_val, 1, S, S)``: their holes (1 = hole), drawn with the split's seed.
    """

    train: tuple[torch.Tensor, ...]
    val_images: torch.Tensor
    val_masks: torch.Tensor


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def _free_form(rng: np.random.Generator, size: int) -> np.ndarray:
    """A few strokes: random walks of a round brush of radius ``size/16 .. size/8``."""
    mask = np.zeros((size, size), dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(int(rng.integers(1, 4))):
        y, x = rng.uniform(0, size, size=2)
        radius = rng.uniform(max(1.0, size / 16), max(1.5, size / 8))
        for _ in range(int(rng.integers(4, 9))):
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(size / 8, size / 4)
            for t in np.linspace(0.0, 1.0, 6):
                cy, cx = y + t * length * np.sin(angle), x + t * length * np.cos(angle)
                mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1.0
            y = float(np.clip(y + length * np.sin(angle), 0, size - 1))
            x = float(np.clip(x + length * np.cos(angle), 0, size - 1))
    return mask


def random_masks(rng: np.random.Generator, n: int, size: int) -> torch.Tensor:
    """``n`` hole masks ``(n, 1, size, size)`` (1 = hole): a rectangle or free-form strokes, half each (see the module
    docstring); never empty."""
    _check_int("random_masks: n", n, 0)
    _check_int("random_masks: size", size, 4)
    out = np.zeros((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        if rng.random() < 0.5:
            h, w = rng.integers(size // 4, size // 2 + 1, size=2)
            y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            out[i, 0, y : y + h, x : x + w] = 1.0
        else:
            out[i, 0] = _free_form(rng, size)
        if not out[i].any():  # pragma: no cover - a stroke always covers its starting pixel
            out[i, 0, size // 2, size // 2] = 1.0
    return torch.from_numpy(out)


def random_crops(rng: np.random.Generator, regions: tuple[torch.Tensor, ...], n: int, size: int) -> torch.Tensor:
    """``n`` random ``size × size`` crops ``(n, 3, size, size)``, each from a region picked uniformly."""
    picks = rng.integers(0, len(regions), size=n)
    crops = []
    for k in picks:
        img = regions[int(k)]
        y = int(rng.integers(0, img.shape[1] - size + 1))
        x = int(rng.integers(0, img.shape[2] - size + 1))
        crops.append(img[:, y : y + size, x : x + size])
    return torch.stack(crops) if crops else torch.empty(0, 3, size, size)


def load_inpainting_split(patch_size: int = 32, *, train_fraction: float = 0.75, seed: int = 0) -> InpaintingSplit:
    """The two sample photographs split by region (see the module docstring), with a fixed validation set.

    Args:
        patch_size: side ``S`` of a crop, ``>= 8``.
        train_fraction: share of each photograph's width (its left part) used for training, in ``(0, 1)``.
        seed: seed of the validation order and masks.
    """
    _check_int("load_inpainting_split: patch_size", patch_size, 8)
    f = train_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
        raise ValueError(f"load_inpainting_split: expected train_fraction in (0, 1), got {f!r}")
    require(_SKLEARN)
    from sklearn.datasets import load_sample_images

    train, val = [], []
    for img in load_sample_images().images:
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        cut = int(round(f * arr.shape[2]))
        if min(cut, arr.shape[2] - cut, arr.shape[1]) < patch_size:
            raise ValueError(f"load_inpainting_split: patch_size={patch_size} does not fit both regions of a "
                             f"{arr.shape[1]}x{arr.shape[2]} image split at column {cut}")
        train.append(arr[:, :, :cut].contiguous())
        held = arr[:, :, cut:]
        for y in range(0, held.shape[1] - patch_size + 1, patch_size):
            for x in range(0, held.shape[2] - patch_size + 1, patch_size):
                val.append(held[:, y : y + patch_size, x : x + patch_size])
    rng = np.random.default_rng(seed)
    # A fixed shuffle, so that any slice of the validation set mixes both photographs as training batches do: a
    # norm that uses batch statistics in eval mode (RN's released code) would otherwise see one photograph a batch.
    images = torch.stack(val)[torch.from_numpy(rng.permutation(len(val)))]
    masks = random_masks(rng, len(images), patch_size)
    return InpaintingSplit(tuple(train), images, masks)
