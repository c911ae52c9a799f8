"""Synthetic image corruptions with the CIFAR-10-C constants, for test-time-adaptation experiments on small images.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019,
https://arxiv.org/abs/1903.12261 (the 32-pixel constants of its CIFAR-10-C generator; ``speckle_noise``,
``gaussian_blur`` and ``saturate`` are three of its four "extra" corruptions, which the benchmark does not report).

What each corruption does to an image ``x`` in ``[0, 1]``, per channel unless said otherwise (c: the severity's
constant from :data:`SEVERITY_CONSTANTS`):

* ``gaussian_noise``: ``x + N(0, c²)``; ``shot_noise``: ``Poisson(x·c) / c``; ``speckle_noise``: ``x + x·N(0, c²)``;
  ``impulse_noise``: every element is hit with probability ``c`` and a hit is set to 1 or 0 with probability ½
  each (salt and pepper, drawn as scikit-image's ``random_noise(mode="s&p")`` draws it).
* ``contrast``: ``(x − m)·c + m`` with ``m`` the channel's spatial mean of that image.
* ``brightness``: RGB → HSV, ``V ← clip(V + c)``, HSV → RGB; ``saturate``: the same with ``S ← clip(S·c₁ + c₂)``.
* ``pixelate``: box down-sampling to ``int(c·size)`` pixels and box up-sampling back (Pillow);
  ``jpeg_compression``: a JPEG round trip at quality ``c`` (Pillow).
* ``gaussian_blur``: Gaussian of σ = c over the image plane (kernel radius ``int(4σ + 0.5)``, edge pixels
  repeated); ``defocus_blur``: the anti-aliased disk (radius, alias σ) = c on a 17 × 17 grid, edges mirrored;
  ``zoom_blur``: the mean of the image and its centre crops zoomed back to full size (bilinear) by the factors
  ``arange(1, c, 0.01)`` (computed in float64; the generator summed in float32).

Each result is clipped to ``[0, 1]``; a ``uint8`` batch comes back as ``uint8(255·result)``, which *truncates*, as the
released CIFAR-10-C files store it (the Pillow-based two return Pillow's ``uint8`` image directly). The noise is
drawn from a generator seeded by ``(seed, corruption, severity)``, so a call is reproducible, unlike the released
generator's global random state.

The colour corruptions act on RGB; a grey batch (one channel, or ``(N, H, W)``) is a grey RGB image, for which
``brightness`` is exactly ``clip(x + c)``. ``saturate`` of a grey image would only tint it (hue 0 is red), so it asks
for three channels.
"""

from __future__ import annotations

import difflib
import io
import math
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from normlab.data._cache import Requirement, require

__all__ = ["CORRUPTIONS", "REQUIREMENTS", "SEVERITY_CONSTANTS", "corrupt"]

_PILLOW = Requirement(module="PIL", distribution="pillow", extra="data")
# ``pixelate`` and ``jpeg_compression`` need Pillow; the others need only numpy.
REQUIREMENTS: tuple[Requirement, ...] = (_PILLOW,)

# The CIFAR-10-C (32 px) constants, severities 1..5 (Hendrycks & Dietterich 2019, make_cifar_c.py).
SEVERITY_CONSTANTS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "saturate": ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),
    # upper ends of ``np.arange(1, end, 0.01)``; that float arange also yields ``end`` itself for some of them
    # (1.06 for severity 1), as it did in the generator, and the zoom factors keep it.
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),
}

CORRUPTIONS: tuple[str, ...] = tuple(SEVERITY_CONSTANTS)

_Array = np.ndarray
_T = TypeVar("_T", torch.Tensor, np.ndarray)


# ---- noise ------------------------------------------------------------------------------------------------------


def _gaussian_noise(x: _Array, c: float, rng: np.random.Generator) -> _Array:
    return x + rng.normal(scale=c, size=x.shape)


def _shot_noise(x: _Array, c: float, rng: np.random.Generator) -> _Array:
    return rng.poisson(x * c) / c


def _impulse_noise(x: _Array, c: float, rng: np.random.Generator) -> _Array:
    # scikit-image's salt and pepper: first which elements flip (<= amount), then salt (<= 1/2) or pepper.
    flipped = rng.random(x.shape) <= c
    salted = rng.random(x.shape) <= 0.5
    out = x.copy()
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out


def _speckle_noise(x: _Array, c: float, rng: np.random.Generator) -> _Array:
    return x + x * rng.normal(scale=c, size=x.shape)


# ---- photometric ------------------------------------------------------------------------------------------------


def _contrast(x: _Array, c: float, rng: np.random.Generator) -> _Array:
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * c + means


def _rgb_to_hsv(rgb: _Array) -> _Array:
    """scikit-image's ``rgb2hsv`` on ``(..., 3)`` floats: hue in ``[0, 1)``, 0 for grey pixels."""
    v = rgb.max(axis=-1)
    delta = v - rgb.min(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(delta == 0, 0.0, delta / v)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        # later maxima overwrite earlier ones, as in scikit-image (blue wins ties, then green)
        h = np.where(r == v, (g - b) / delta, 0.0)
        h = np.where(g == v, 2.0 + (b - r) / delta, h)
        h = np.where(b == v, 4.0 + (r - g) / delta, h)
    h = np.where(delta == 0, 0.0, (h / 6.0) % 1.0)
    return np.stack([h, s, v], axis=-1)


def _hsv_to_rgb(hsv: _Array) -> _Array:
    """scikit-image's ``hsv2rgb``: the six-sector formula."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    sector = hi.astype(np.int64) % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    table = np.stack([np.stack(rgb, axis=-1) for rgb in choices])  # (6, ..., 3)
    index = np.broadcast_to(sector[None, ..., None], (1,) + hsv.shape)
    return np.take_along_axis(table, index, axis=0)[0]


def _brightness(x: _Array, c: float, rng: np.random.Generator) -> _Array:
    if x.shape[-1] == 1:  # a grey pixel has S = 0, so the HSV round trip is exactly clip(x + c)
        return np.clip(x + c, 0.0, 1.0)
    hsv = _rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0.0, 1.0)
    return _hsv_to_rgb(hsv)


def _saturate(x: _Array, c: tuple[float, float], rng: np.random.Generator) -> _Array:
    hsv = _rgb_to_hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0.0, 1.0)
    return _hsv_to_rgb(hsv)


# ---- blur -------------------------------------------------------------------------------------------------------


def _correlate_plane(x: _Array, kernel: _Array, pad_mode: str) -> _Array:
    """Correlate every ``(H, W)`` plane of ``(N, H, W, C)`` with a 2-d ``kernel`` (odd sides), padding by
    ``pad_mode`` (numpy's ``"edge"`` repeats the border pixel, ``"reflect"`` mirrors without repeating it)."""
    kh, kw = kernel.shape
    rh, rw = kh // 2, kw // 2
    padded = np.pad(x, ((0, 0), (rh, rh), (rw, rw), (0, 0)), mode=pad_mode)  # type: ignore[call-overload]
    h, w = x.shape[1], x.shape[2]
    out = np.zeros(x.shape, dtype=np.result_type(x, kernel))
    for i in range(kh):
        for j in range(kw):
            if kernel[i, j] != 0:
                out += kernel[i, j] * padded[:, i : i + h, j : j + w, :]
    return out


def _gaussian_kernel_1d(sigma: float, radius: int) -> _Array:
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / sigma**2 * offsets**2)
    return phi / phi.sum()


def _gaussian_blur(x: _Array, c: float, rng: np.random.Generator) -> _Array:
    # scikit-image ``gaussian(mode="nearest", truncate=4)``: scipy's separable kernel of radius int(4σ + 0.5)
    k = _gaussian_kernel_1d(c, int(4.0 * c + 0.5))
    # separable, rows then columns, as scipy's gaussian_filter applies it
    rows = _correlate_plane(x, k[:, None], "edge")
    return _correlate_plane(rows, k[None, :], "edge")


def defocus_kernel(radius: float, alias_blur: float) -> _Array:
    """The anti-aliased disk of ``defocus_blur``: the disk ``X² + Y² ≤ radius²`` on the 17 × 17 grid of offsets
    ``-8..8`` (radius ≤ 8), normalised to sum 1, then smoothed by a 3 × 3 Gaussian of σ ``alias_blur`` (an
    OpenCV ``GaussianBlur``: weights ``exp(-d²/2σ²)`` over offsets ``-1..1``, normalised). float32, as the
    generator builds it."""
    if not 0 < radius <= 8:
        raise ValueError(f"defocus_kernel: expected radius in (0, 8], got {radius!r}")
    offsets = np.arange(-8, 9, dtype=np.float64)
    xx, yy = np.meshgrid(offsets, offsets)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = _gaussian_kernel_1d(alias_blur, 1)
    # the disk is zero near the grid's border, so the border rule of the 3 x 3 smoothing never matters
    kernel = _correlate_plane(disk[None, :, :, None], np.outer(g, g), "constant")[0, :, :, 0]
    return kernel.astype(np.float32)


def _defocus_blur(x: _Array, c: tuple[float, float], rng: np.random.Generator) -> _Array:
    kernel = defocus_kernel(*c)
    # keep only the kernel's non-zero support (the zeros add nothing), so small images can be mirrored at the edge
    rows, cols = np.flatnonzero(kernel.any(axis=1)), np.flatnonzero(kernel.any(axis=0))
    r = max(8 - int(rows[0]), int(rows[-1]) - 8, 8 - int(cols[0]), int(cols[-1]) - 8)
    # (radius <= 2 for the CIFAR constants, and images have >= 4 pixels a side, so the mirror stays inside)
    return _correlate_plane(x, kernel[8 - r : 9 + r, 8 - r : 9 + r], "reflect")


def _zoom_matrix(size: int, factor: float) -> _Array:
    """The ``(size, size)`` linear map of one axis of the centre crop-and-zoom: the crop keeps ``ceil(size / factor)``
    pixels, scipy's ``zoom(order=1)`` maps its output ``o`` of ``round(crop · factor)`` pixels to the input coordinate
    ``o · (crop − 1) / (out − 1)`` (linear interpolation), and the middle ``size`` outputs are kept."""
    crop = int(math.ceil(size / factor))
    top = (size - crop) // 2
    out = int(round(crop * factor))
    trim = (out - size) // 2
    pos = np.arange(trim, trim + size, dtype=np.float64)
    coord = pos * ((crop - 1) / (out - 1)) if out > 1 else np.zeros(size)
    lo = np.floor(coord).astype(np.int64)
    hi = np.minimum(lo + 1, crop - 1)
    w = coord - lo
    m = np.zeros((size, size))
    np.add.at(m, (np.arange(size), lo + top), 1.0 - w)
    np.add.at(m, (np.arange(size), hi + top), w)
    return m


def _zoom_blur(x: _Array, c: float, rng: np.random.Generator) -> _Array:
    n, h, w, ch = x.shape
    factors = np.arange(1, c, 0.01)
    # each zoom is linear and separable (rows by A, columns by B): the mean of the image and its zooms is one
    # (H·W, H·W) map, sum of kron(A, B), applied to every flattened plane at once
    op = np.eye(h * w)
    for z in factors:
        op += np.kron(_zoom_matrix(h, float(z)), _zoom_matrix(w, float(z)))
    op /= len(factors) + 1
    planes = x.transpose(0, 3, 1, 2).reshape(n * ch, h * w)
    return (planes @ op.T).reshape(n, ch, h, w).transpose(0, 2, 3, 1)


# ---- Pillow ------------------------------------------------------------------------------------------------------


def _pil_map(u8: _Array, fn: Callable[[Any], Any]) -> _Array:
    """Apply ``fn`` to every image of a ``(N, H, W, C)`` uint8 batch as a Pillow image (mode ``L`` or ``RGB``)."""
    from PIL import Image

    grey = u8.shape[-1] == 1
    out = np.empty_like(u8)
    for i, img in enumerate(u8):
        res = np.asarray(fn(Image.fromarray(img[..., 0] if grey else img)))
        out[i] = res[..., None] if grey else res
    return out


def _pixelate(u8: _Array, c: float) -> _Array:
    from PIL import Image

    h, w = u8.shape[1], u8.shape[2]
    small = (max(1, int(w * c)), max(1, int(h * c)))
    box = Image.Resampling.BOX
    return _pil_map(u8, lambda im: im.resize(small, box).resize((w, h), box))


def _jpeg_round_trip(im: Any, quality: int) -> Any:
    from PIL import Image

    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def _jpeg_compression(u8: _Array, c: int) -> _Array:
    return _pil_map(u8, lambda im: _jpeg_round_trip(im, c))


_FLOAT_OPS: dict[str, Callable[[_Array, Any, np.random.Generator], _Array]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "contrast": _contrast,
    "brightness": _brightness,
    "saturate": _saturate,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "zoom_blur": _zoom_blur,
}
_UINT8_OPS: dict[str, Callable[[_Array, Any], _Array]] = {"pixelate": _pixelate, "jpeg_compression": _jpeg_compression}


# ---- public entry point -------------------------------------------------------------------------------------------


def _check_args(name: object, severity: object, seed: object) -> None:
    if not isinstance(name, str) or name not in SEVERITY_CONSTANTS:
        close = difflib.get_close_matches(str(name), CORRUPTIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"corrupt: unknown name={name!r}{hint}; expected one of {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"corrupt: expected severity to be an int in 1..5, got {severity!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"corrupt: expected seed to be an int >= 0, got {seed!r}")


def _to_nhwc(images: object, name: str) -> _Array:
    """Validate the batch and return it as ``(N, H, W, C)`` numpy (uint8 as given, floats as float64)."""
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        # numpy has no bfloat16; every float batch is computed in float64 anyway
        arr = (t.double() if t.is_floating_point() else t).numpy()
    elif isinstance(images, np.ndarray):
        arr = images
    else:
        raise TypeError(f"corrupt: expected images to be a torch.Tensor or numpy.ndarray, got {type(images).__name__}")
    shape = tuple(arr.shape)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or min(arr.shape[2:]) < 4:
        raise ValueError(
            "corrupt: expected images of shape (N, C, H, W) with C = 1 (grey) or 3 (RGB), or (N, H, W) grey, "
            f"with H, W >= 4; got shape {shape}"
        )
    if name == "saturate" and arr.shape[1] != 3:
        raise ValueError(f"corrupt: saturate changes colour saturation and needs RGB images (C = 3), got shape {shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"corrupt: expected images of dtype uint8 (0..255) or a float dtype (0..1), got {arr.dtype}")
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
        raise ValueError(
            f"corrupt: expected float images in [0, 1], got values in [{arr.min()}, {arr.max()}] (uint8 images are "
            "taken as 0..255)"
        )
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1), dtype=np.float64)


def _rng_for(seed: int, name: str, severity: int) -> np.random.Generator:
    # crc32 of the name, not its position in CORRUPTIONS, so adding a corruption never changes another's noise
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(severity)])


def corrupt(images: _T, name: str, severity: int, *, seed: int = 0) -> _T:
    """Corrupt a batch of images as CIFAR-10-C does (see the module docstring for the operations and constants).

    Args:
        images: ``(N, C, H, W)`` with ``C`` = 1 (grey) or 3 (RGB), or ``(N, H, W)`` grey; ``uint8`` in ``0..255``
            or a float dtype in ``[0, 1]``; a ``torch.Tensor`` or a ``numpy.ndarray``.
        name: one of :data:`CORRUPTIONS`.
        severity: 1..5.
        seed: with ``(name, severity)``, seeds the noise: the same call gives the same images. The draw covers the
            whole batch, so a sub-batch is not corrupted as the same images inside a larger batch.

    Returns:
        The corrupted batch with the input's type, layout, dtype and device. ``uint8`` results are
        ``uint8(255·clip(y, 0, 1))`` (truncation, as the released sets); float results are ``clip(y, 0, 1)``
        unquantised, except ``pixelate`` and ``jpeg_compression``, which round the input to ``uint8`` for Pillow
        and return Pillow's ``uint8`` result divided by 255.

    Example:
        >>> x = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
        >>> corrupt(x, "contrast", 5).unique().tolist()  # a flat image is unchanged, but 255·(128/255) = 127.99…
        [127]
    """
    _check_args(name, severity, seed)
    nhwc = _to_nhwc(images, name)
    c = SEVERITY_CONSTANTS[name][int(severity) - 1]
    is_uint8 = nhwc.dtype == np.uint8
    if name in _UINT8_OPS:
        require(_PILLOW)
        u8 = nhwc if is_uint8 else np.rint(nhwc * 255.0).astype(np.uint8)
        res = _UINT8_OPS[name](u8, c)
        out = res if is_uint8 else res / 255.0
    else:
        x = nhwc / 255.0 if is_uint8 else nhwc
        y = np.clip(_FLOAT_OPS[name](x, c, _rng_for(int(seed), name, int(severity))), 0.0, 1.0)
        out = (y * 255).astype(np.uint8) if is_uint8 else y
    out = out.transpose(0, 3, 1, 2)
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            out = out[:, 0]
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=images.device, dtype=images.dtype)
    if images.ndim == 3:
        out = out[:, 0]
    return np.ascontiguousarray(out).astype(images.dtype, copy=False)
