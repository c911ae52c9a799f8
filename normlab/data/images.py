"""Small real image sets that ship with scikit-learn (no download): the 8×8 digits and the two sample photographs.

* :func:`load_digits_split`: scikit-learn's ``load_digits`` (1,797 handwritten digits, 8×8, values 0–16; from the
  UCI "Optical Recognition of Handwritten Digits" set) as ``(N, 1, 8, 8)`` float tensors in ``[0, 1]`` with a
  deterministic, class-stratified train / validation split.
* :func:`sample_image_patches`: ``load_sample_images`` (``china.jpg``, ``flower.jpg``, 427×640 RGB) cut into square
  patches, for inpainting-style experiments.

scikit-learn is optional: without it these functions raise ``ImportError`` naming ``pip install 'normlab[data]'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from normlab.data._cache import Requirement, require

__all__ = ["REQUIREMENTS", "DigitsSplit", "load_digits_split", "sample_image_patches"]

_SKLEARN = Requirement(module="sklearn", distribution="scikit-learn", extra="data")
# What every loader of this module needs; ``normlab lab`` checks it before a digits run starts.
REQUIREMENTS: tuple[Requirement, ...] = (_SKLEARN,)


@dataclass(frozen=True)
class DigitsSplit:
    """The digits set split into train and validation.

    Attributes:
        x_train: ``(N_train, 1, 8, 8)`` float32 in ``[0, 1]``.
        y_train: ``(N_train,)`` int64 labels ``0..9``.
        x_val: ``(N_val, 1, 8, 8)`` float32.
        y_val: ``(N_val,)`` int64.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int = 10


def load_digits_split(*, val_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """scikit-learn's digits with a deterministic stratified split: per class, a ``seed``-ed permutation puts the
    first ``round(val_fraction * n_class)`` samples in validation.

    Args:
        val_fraction: share of each class held out, in ``(0, 1)``.
        seed: seed of the split permutation (not of training).

    Example:
        >>> d = load_digits_split()  # doctest: +SKIP
        >>> d.x_train.shape[1:], d.y_val.unique().numel()  # doctest: +SKIP
        (torch.Size([1, 8, 8]), 10)
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"load_digits_split: expected val_fraction in (0, 1), got {val_fraction!r}")
    require(_SKLEARN)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val_idx: list[np.ndarray] = []
    train_idx: list[np.ndarray] = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(val_fraction * len(idx)))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    tr, va = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))
    return DigitsSplit(
        x_train=torch.from_numpy(images[tr][:, None].copy()),
        y_train=torch.from_numpy(labels[tr].copy()),
        x_val=torch.from_numpy(images[va][:, None].copy()),
        y_val=torch.from_numpy(labels[va].copy()),
    )


def sample_image_patches(patch_size: int = 32, *, stride: int | None = None) -> torch.Tensor:
    """Square patches of scikit-learn's two sample photographs, row-major, ``china.jpg`` first.

    Args:
        patch_size: side of a patch in pixels.
        stride: step between patches (default ``patch_size``: non-overlapping).

    Returns:
        ``(N, 3, patch_size, patch_size)`` float32 in ``[0, 1]``.
    """
    for name, v in (("patch_size", patch_size), ("stride", patch_size if stride is None else stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"sample_image_patches: expected {name} to be an int >= 1, got {v!r}")
    step = patch_size if stride is None else stride
    require(_SKLEARN)
    from sklearn.datasets import load_sample_images

    patches = []
    for img in load_sample_images().images:
        arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
        h, w = arr.shape[:2]
        if patch_size > min(h, w):
            raise ValueError(f"sample_image_patches: patch_size={patch_size} exceeds the image size {h}x{w}")
        for y in range(0, h - patch_size + 1, step):
            for x in range(0, w - patch_size + 1, step):
                patches.append(arr[y : y + patch_size, x : x + patch_size].transpose(2, 0, 1))
    return torch.from_numpy(np.stack(patches))
