"""Digits under distribution shift: scikit-learn's 8×8 digits enlarged to a size the CIFAR-10-C corruptions suit, split
into a clean training set and a test set, and the test set corrupted into one domain per (corruption, severity).

The corruptions are those of :mod:`normlab.data.corruptions` (Hendrycks & Dietterich, ICLR 2019,
https://arxiv.org/abs/1903.12261), with their 32-pixel CIFAR constants.

Why 16 × 16 and three channels by default:

* The constants of the blurs and of ``pixelate`` are in pixels of a 32-pixel image whose detail is at the pixel
  scale. A digit has 8 × 8 pixels of detail; enlarged 4× to 32 × 32, a σ = 1 blur covers a quarter of one original
  pixel and the blur domains look almost clean. Enlarged 2× to 16 × 16 the same blur spans half an original pixel,
  and the test set of every domain is 4× cheaper to push through a network than at 32 × 32, which matters for
  suites that adapt over dozens of domains on two CPU cores.
* The released corruptions draw their noise per RGB channel and ``brightness`` / ``saturate`` act on RGB, so a
  grey digit replicated to three channels receives the same (coloured) corruptions a CIFAR image does, and the
  networks keep a CIFAR-like three-channel stem. ``channels=1`` is available (``saturate`` then is not a domain:
  on grey it would only tint).

The enlargement is bilinear (a smooth digit, as a photograph's pixels are, rather than 2 × 2 blocks), and the
clean images are stored as ``uint8``, the form the corruptions take as input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from normlab.data._cache import Requirement, require
from normlab.data.corruptions import CORRUPTIONS, corrupt
from normlab.data.corruptions import REQUIREMENTS as _CORRUPTION_REQUIREMENTS
from normlab.data.images import REQUIREMENTS as _DIGITS_REQUIREMENTS
from normlab.data.images import load_digits_split

__all__ = ["REQUIREMENTS", "ShiftedDigits", "load_shifted_digits"]

# scikit-learn for the digits, Pillow for pixelate / jpeg_compression; ``normlab lab`` checks them before a run.
REQUIREMENTS: tuple[Requirement, ...] = _DIGITS_REQUIREMENTS + _CORRUPTION_REQUIREMENTS


@dataclass(frozen=True)
class ShiftedDigits:
    """Clean digits for training a source model and corrupted test domains for adapting it.

    Attributes:
        x_train: ``(N_train, C, S, S)`` uint8, clean.
        y_train: ``(N_train,)`` int64 labels ``0..9``.
        x_test: ``(N_test, C, S, S)`` uint8, clean (the "source" domain of the test set).
        y_test: ``(N_test,)`` int64.
        domains: ``{(corruption, severity): (x, y)}``: the test set corrupted; ``y`` is ``y_test`` and ``x[i]`` is
            ``x_test[i]`` corrupted, in the order of ``corruptions`` then ``severities``.
        size: ``S``.
        channels: ``C``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    domains: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    size: int
    channels: int
    num_classes: int = 10


def _to_uint8_images(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """``(N, 1, 8, 8)`` floats in ``[0, 1]`` -> ``(N, channels, size, size)`` uint8 (bilinear, rounded)."""
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    u8 = torch.round(x.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return u8.expand(-1, channels, -1, -1).contiguous()


def load_shifted_digits(
    *,
    size: int = 16,
    channels: int = 3,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    test_fraction: float = 0.5,
    split_seed: int = 0,
    corruption_seed: int = 0,
) -> ShiftedDigits:
    """scikit-learn's digits as uint8 images, split into train / test, with corrupted test domains.

    Args:
        size: side of the images (the 8 × 8 digits are enlarged bilinearly); >= 8. See the module docstring for why
            16 is the default.
        channels: 3 (grey replicated to RGB, default) or 1.
        corruptions: names from :data:`~normlab.data.corruptions.CORRUPTIONS`; default all of them (without
            ``saturate`` when ``channels=1``).
        severities: severities 1..5 to build for each corruption.
        test_fraction: share of every class held out for test (stratified, seeded by ``split_seed``, as
            :func:`~normlab.data.images.load_digits_split`). The default 0.5 (about 900 test images) gives a
            batch-64 stream 14 batches per domain and a Dirichlet order (>= 10 samples per chunk) room to work,
            while about 900 training images still train a small conv net well.
        split_seed: seed of the train / test split.
        corruption_seed: ``seed`` of :func:`~normlab.data.corruptions.corrupt` (each (corruption, severity) draws
            its own noise from it).

    Returns:
        :class:`ShiftedDigits`.

    Example:
        >>> d = load_shifted_digits(corruptions=["gaussian_noise"], severities=[5])  # doctest: +SKIP
        >>> d.domains["gaussian_noise", 5][0].shape, d.x_test.dtype  # doctest: +SKIP
        (torch.Size([898, 3, 16, 16]), torch.uint8)
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"load_shifted_digits: expected size to be an int >= 8, got {size!r}")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"load_shifted_digits: expected channels to be 1 or 3, got {channels!r}")
    if corruptions is None:
        names = [c for c in CORRUPTIONS if channels == 3 or c != "saturate"]
    else:
        names = list(corruptions)
        unknown = [c for c in names if c not in CORRUPTIONS]
        if unknown or (channels == 1 and "saturate" in names):
            bad = unknown or ["saturate"]
            why = f"expected names from {', '.join(CORRUPTIONS)}" if unknown else "saturate needs channels=3"
            raise ValueError(f"load_shifted_digits: bad corruptions {bad}: {why}")
    sevs = list(severities)
    if not sevs or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= s <= 5 for s in sevs):
        raise ValueError(f"load_shifted_digits: expected severities to be ints in 1..5, got {severities!r}")
    for r in REQUIREMENTS:
        require(r)
    split = load_digits_split(val_fraction=test_fraction, seed=split_seed)
    x_train = _to_uint8_images(split.x_train, size, channels)
    x_test = _to_uint8_images(split.x_val, size, channels)
    domains = {
        (name, int(s)): (corrupt(x_test, name, int(s), seed=corruption_seed), split.y_val)
        for name in names
        for s in sevs
    }
    return ShiftedDigits(
        x_train=x_train,
        y_train=split.y_train,
        x_test=x_test,
        y_test=split.y_val,
        domains=domains,
        size=size,
        channels=channels,
    )
