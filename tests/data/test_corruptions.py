"""Corruptions with the CIFAR-10-C constants: the hand examples, scipy as the oracle of the two blurs it defines, and
the properties (severity order, dtype / range, seeding, errors)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from normlab.data.corruptions import CORRUPTIONS, SEVERITY_CONSTANTS, corrupt, defocus_kernel
from tests._extras import require

# The CIFAR (32 px) column of the table, severities 1..5, as the published generator has them.
CIFAR_TABLE = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),
}


def _smooth_images(n: int = 16, size: int = 16, grid: int = 4, seed: int = 0) -> torch.Tensor:
    """Photograph-like uint8 RGB test images: random ``grid`` x ``grid`` colour grids enlarged bilinearly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, grid, grid, generator=g) * 0.8 + 0.1
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return torch.round(fine * 255).to(torch.uint8)


def test_the_table_is_the_cifar_column_and_every_name_is_in_it() -> None:
    assert set(CORRUPTIONS) == set(CIFAR_TABLE) and len(CORRUPTIONS) == 12
    for name, row in CIFAR_TABLE.items():
        assert np.allclose(np.array(SEVERITY_CONSTANTS[name], dtype=float), np.array(row, dtype=float)), name


def test_contrast_hand_example_and_uint8_truncation() -> None:
    # severity 5 (c = 0.15): a pixel 0.8 in a channel of mean 0.5 -> 0.3 * 0.15 + 0.5 = 0.545
    x = torch.tensor([0.8, 0.2] * 8, dtype=torch.float64).reshape(1, 1, 4, 4)
    y = corrupt(x, "contrast", 5)
    assert y.dtype == torch.float64
    assert math.isclose(float(y[0, 0, 0, 0]), 0.545, abs_tol=1e-12)
    assert math.isclose(float(y[0, 0, 0, 1]), 0.455, abs_tol=1e-12)
    # the same in uint8 (204 = 0.8, 51 = 0.2): 0.545 * 255 = 138.975 is stored as 138 (truncated), 0.455 * 255 =
    # 116.025 as 116
    u = torch.tensor([204, 51] * 8, dtype=torch.uint8).reshape(1, 1, 4, 4)
    v = corrupt(u, "contrast", 5)
    assert v.dtype == torch.uint8 and v[0, 0, 0, 0].item() == 138 and v[0, 0, 0, 1].item() == 116


def test_shot_noise_hand_example_mean_and_std() -> None:
    # severity 5 (c = 50) at x = 0.5: Poisson(25) / 50 has mean 0.5 and std sqrt(25) / 50 = 0.1
    x = torch.full((64, 3, 32, 32), 0.5, dtype=torch.float64)
    y = corrupt(x, "shot_noise", 5)
    assert abs(float(y.mean()) - 0.5) < 1e-3
    assert abs(float(y.std()) - 0.1) < 1e-3
    # Poisson values: every output is a multiple of 1/50
    assert torch.allclose(y * 50, torch.round(y * 50), atol=1e-9)


def test_gaussian_noise_hand_example_additive_std() -> None:
    # severity 5 (c = 0.10): additive std 0.10, 25.5 grey levels
    x = torch.full((64, 3, 32, 32), 0.5, dtype=torch.float64)
    d = corrupt(x, "gaussian_noise", 5) - x
    assert abs(float(d.std()) - 0.10) < 1e-3 and abs(float(d.mean())) < 1e-3
    u = torch.full((64, 3, 32, 32), 128, dtype=torch.uint8)
    du = corrupt(u, "gaussian_noise", 5).double() - 128
    assert abs(float(du.std()) - 25.5) < 0.3
    assert abs(float(du.mean()) + 0.5) < 0.3  # truncation takes half a grey level off on average


def test_speckle_and_impulse_noise_statistics() -> None:
    x = torch.full((64, 3, 32, 32), 0.5, dtype=torch.float64)
    d = corrupt(x, "speckle_noise", 5) - x  # x * N(0, 0.2^2) at x = 0.5: std 0.1
    assert abs(float(d.std()) - 0.1) < 1e-3
    y = corrupt(x, "impulse_noise", 5)  # each element hit w.p. 0.07, then 0 or 1 with equal odds
    hit = y != 0.5
    assert set(y[hit].unique().tolist()) == {0.0, 1.0}
    assert abs(float(hit.double().mean()) - 0.07) < 3e-3
    assert abs(float((y[hit] == 1.0).double().mean()) - 0.5) < 0.03


def test_brightness_and_saturate_hand_examples() -> None:
    # (0.2, 0.4, 0.6): V = 0.6, S = 2/3, hue in the blue sector
    x = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64).reshape(1, 3, 1, 1).expand(1, 3, 4, 4).contiguous()
    # brightness 5 (c = 0.3): V 0.6 -> 0.9 at fixed H, S scales the pixel by 1.5
    assert torch.allclose(corrupt(x, "brightness", 5)[0, :, 0, 0], torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64))
    # saturate 1 (0.3, 0): S -> 0.2, so min = V (1 - S) = 0.48 and the middle channel (f = 1/2) 0.54
    assert torch.allclose(corrupt(x, "saturate", 1)[0, :, 0, 0], torch.tensor([0.48, 0.54, 0.6], dtype=torch.float64))
    # a grey image is grey RGB: brightness adds c (clipped) and is the same on 1 and 3 channels
    g = torch.tensor([0.0, 0.25, 0.9, 1.0] * 4, dtype=torch.float64).reshape(1, 1, 4, 4)
    assert torch.allclose(corrupt(g, "brightness", 5), (g + 0.3).clamp(max=1.0))
    assert torch.allclose(corrupt(g.expand(1, 3, 4, 4), "brightness", 5), (g + 0.3).clamp(max=1.0).expand(1, 3, 4, 4))


def test_blurs_match_scipy() -> None:
    ndimage = require("scipy.ndimage", "data")
    rng = np.random.default_rng(0)
    x = rng.random((3, 3, 17, 12))
    for s, sigma in enumerate(CIFAR_TABLE["gaussian_blur"], start=1):
        ref = ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
        assert np.allclose(corrupt(x, "gaussian_blur", s), np.clip(ref, 0, 1), atol=1e-12), sigma

    def clipped_zoom(img: np.ndarray, z: float) -> np.ndarray:  # (H, W, C), as the generator writes it
        h, w = img.shape[:2]
        ch, cw = math.ceil(h / z), math.ceil(w / z)
        top, left = (h - ch) // 2, (w - cw) // 2
        out = ndimage.zoom(img[top : top + ch, left : left + cw], (z, z, 1), order=1)
        a, b = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
        return out[a : a + h, b : b + w]

    for s, end in enumerate(CIFAR_TABLE["zoom_blur"], start=1):
        factors = np.arange(1, end, 0.01)
        hwc = x.transpose(0, 2, 3, 1)
        ref = np.stack([(im + sum(clipped_zoom(im, z) for z in factors)) / (len(factors) + 1) for im in hwc])
        assert np.allclose(corrupt(x, "zoom_blur", s), ref.transpose(0, 3, 1, 2), atol=1e-12), end


def test_defocus_kernel_hand_example() -> None:
    # radius 0.3 holds only the centre; alias σ 0.4 spreads it by the 3-tap Gaussian [e, 1, e] / (1 + 2e),
    # e = exp(-1 / (2 * 0.16))
    e = math.exp(-1 / 0.32)
    g = np.array([e, 1.0, e]) / (1 + 2 * e)
    k = defocus_kernel(0.3, 0.4)
    assert k.shape == (17, 17) and k.dtype == np.float32
    assert np.allclose(k[7:10, 7:10], np.outer(g, g), atol=1e-7) and k.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.count_nonzero(k) == 9
    # radius 1 holds the centre and its 4 neighbours (0.2 each) before smoothing
    assert np.count_nonzero(defocus_kernel(1.0, 1e-3) > 1e-6) == 5
    # defocus of a constant image is the constant (the kernel sums to one, mirrored edges)
    flat = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    assert torch.allclose(corrupt(flat, "defocus_blur", 5), flat, atol=1e-6)


def test_pixelate_and_jpeg_are_the_pillow_operations() -> None:
    image_mod = require("PIL.Image", "data")
    x = _smooth_images(4)
    hwc = x.permute(0, 2, 3, 1).numpy()
    box = image_mod.Resampling.BOX
    for s, (c, q) in enumerate(zip(CIFAR_TABLE["pixelate"], CIFAR_TABLE["jpeg_compression"]), start=1):
        px, jp = corrupt(x, "pixelate", s), corrupt(x, "jpeg_compression", s)
        for i, im in enumerate(hwc):
            small = int(16 * c)
            ref = image_mod.fromarray(im).resize((small, small), box).resize((16, 16), box)
            assert np.array_equal(px[i].permute(1, 2, 0).numpy(), np.asarray(ref))
            buf = io.BytesIO()
            image_mod.fromarray(im).save(buf, "JPEG", quality=q)
            assert np.array_equal(jp[i].permute(1, 2, 0).numpy(), np.asarray(image_mod.open(buf)))


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n != "saturate"])
def test_severity_increases_mean_absolute_change(name: str) -> None:
    # saturate is left out by design: severities 1-2 desaturate (S x 0.3, x 0.1) and 3-5 saturate (x 1.5 ... 2.5).
    # Pixelate is measured on white noise, where losing resolution is all it does: on smooth content its mean change
    # is not monotone (a box resampling 32 -> 24 -> 32 lines up with the pixels and changes them less than
    # 32 -> 27 -> 32). 32 px, the size the constants are for.
    if name == "pixelate":
        x = torch.randint(0, 256, (32, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    else:
        x = _smooth_images(32, size=32, grid=8)
    change = [float((corrupt(x, name, s).double() - x.double()).abs().mean()) for s in range(1, 6)]
    assert all(b > a for a, b in zip(change, change[1:])), change
    assert change[0] > 0


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_dtype_layout_range_and_container_are_kept(name: str) -> None:
    u = _smooth_images(3)
    out = corrupt(u, name, 3)
    assert out.dtype == torch.uint8 and out.shape == u.shape
    f = u.float() / 255
    outf = corrupt(f, name, 3)
    assert outf.dtype == torch.float32 and outf.shape == f.shape
    assert float(outf.min()) >= 0.0 and float(outf.max()) <= 1.0
    arr = corrupt(u.numpy(), name, 3)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and np.array_equal(arr, out.numpy())
    if name != "saturate":
        grey = corrupt(u[:, 0], name, 3)  # (N, H, W)
        assert grey.shape == u[:, 0].shape and torch.equal(grey, corrupt(u[:, :1], name, 3)[:, 0])


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n not in ("pixelate", "jpeg_compression")])
def test_uint8_result_is_the_truncated_float_result(name: str) -> None:
    u = _smooth_images(4)
    f = (u.double() / 255).numpy()  # the generator's np.array(x) / 255.
    assert np.array_equal(corrupt(u, name, 4).numpy(), (corrupt(f, name, 4) * 255).astype(np.uint8))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_seeded_per_corruption_and_severity(name: str) -> None:
    x = _smooth_images(4)
    assert torch.equal(corrupt(x, name, 5, seed=3), corrupt(x, name, 5, seed=3))
    noisy = name.endswith("_noise")
    assert torch.equal(corrupt(x, name, 5, seed=3), corrupt(x, name, 5, seed=4)) != noisy


def test_noise_differs_between_corruptions_with_the_same_constant_shape() -> None:
    # gaussian and speckle both draw normals: seeded by the name, their draws differ
    x = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    g = (corrupt(x, "gaussian_noise", 5) - x) / 0.10
    sp = (corrupt(x, "speckle_noise", 5) - x) / (0.5 * 0.20)
    assert not torch.allclose(g, sp)


def test_bad_arguments_name_the_parameter() -> None:
    x = _smooth_images(2)
    with pytest.raises(ValueError, match=r"unknown name='gausian_noise' \(did you mean 'gaussian_noise'\?\)"):
        corrupt(x, "gausian_noise", 1)
    with pytest.raises(ValueError, match=r"expected severity to be an int in 1\.\.5, got 0"):
        corrupt(x, "contrast", 0)
    with pytest.raises(ValueError, match=r"expected severity to be an int in 1\.\.5, got True"):
        corrupt(x, "contrast", True)
    with pytest.raises(ValueError, match=r"expected seed to be an int >= 0, got -1"):
        corrupt(x, "contrast", 1, seed=-1)
    layout = r"shape \(N, C, H, W\) with C = 1 \(grey\) or 3 \(RGB\), or \(N, H, W\) grey"
    with pytest.raises(ValueError, match=layout + r".*got shape \(2, 4, 16, 16\)"):
        corrupt(torch.zeros(2, 4, 16, 16, dtype=torch.uint8), "contrast", 1)
    with pytest.raises(ValueError, match=r"got shape \(16, 16\)"):
        corrupt(torch.zeros(16, 16, dtype=torch.uint8), "contrast", 1)
    with pytest.raises(ValueError, match=r"saturate .* needs RGB images \(C = 3\), got shape \(2, 1, 16, 16\)"):
        corrupt(x[:, :1], "saturate", 1)
    with pytest.raises(ValueError, match=r"expected float images in \[0, 1\], got values in \[0\.0, 2\.0\]"):
        corrupt(torch.tensor([0.0, 2.0]).repeat(1, 1, 4, 2), "contrast", 1)
    with pytest.raises(TypeError, match=r"dtype uint8 \(0\.\.255\) or a float dtype \(0\.\.1\), got int64"):
        corrupt(torch.zeros(1, 1, 8, 8, dtype=torch.int64), "contrast", 1)
    with pytest.raises(TypeError, match=r"expected images to be a torch\.Tensor or numpy\.ndarray, got list"):
        corrupt([[0.0]], "contrast", 1)  # type: ignore[type-var]
