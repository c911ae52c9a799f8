"""Inpainting data: the region split holds no validation pixel in training, the validation set and masks are
fixed, training crops and masks are functions of the generator, and bad arguments are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normlab.data.inpainting import load_inpainting_split, random_crops, random_masks


def test_region_split_has_no_leakage_and_a_fixed_validation_set() -> None:
    from sklearn.datasets import load_sample_images

    split = load_inpainting_split(32, train_fraction=0.75)
    photos = [torch.from_numpy(np.asarray(i, dtype=np.float32).transpose(2, 0, 1) / 255.0)
              for i in load_sample_images().images]
    assert [t.shape for t in split.train] == [(3, 427, 480)] * 2
    for region, photo in zip(split.train, photos):
        assert torch.equal(region, photo[:, :, :480])  # the left three quarters only
    # 13 rows x 5 columns of 32x32 crops in each photograph's right quarter (160 columns)
    assert split.val_images.shape == (130, 3, 32, 32) and split.val_masks.shape == (130, 1, 32, 32)
    grid = [(k, y, x) for k in range(2) for y in range(0, 13 * 32, 32) for x in range(480, 640, 32)]
    found = []
    for crop in split.val_images:
        found += [g for g in grid if torch.equal(crop, photos[g[0]][:, g[1] : g[1] + 32, g[2] : g[2] + 32])]
    assert sorted(found) == grid  # each crop once, in a shuffled order ...
    assert {k for k, _, _ in found[:65]} == {0, 1}  # ... so that a slice mixes both photographs
    again = load_inpainting_split(32, train_fraction=0.75)
    assert torch.equal(again.val_masks, split.val_masks) and torch.equal(again.val_images, split.val_images)


def test_masks_are_binary_never_empty_and_seeded() -> None:
    m = random_masks(np.random.default_rng(3), 64, 32)
    assert m.shape == (64, 1, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0}
    ratio = m.mean(dim=(1, 2, 3))
    assert bool((ratio > 0).all()) and float(ratio.max()) < 0.9
    assert torch.equal(m, random_masks(np.random.default_rng(3), 64, 32))
    assert not torch.equal(m, random_masks(np.random.default_rng(4), 64, 32))
    # both kinds: a rectangle's hole is its bounding box; free-form strokes leave gaps in theirs
    kinds = set()
    for mask in m[:, 0]:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        box = (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1)
        kinds.add(box == int(mask.sum()))
    assert kinds == {True, False}


def test_random_crops_come_from_the_regions() -> None:
    regions = (torch.arange(3 * 10 * 12, dtype=torch.float32).reshape(3, 10, 12),)
    crops = random_crops(np.random.default_rng(0), regions, 5, 4)
    assert crops.shape == (5, 3, 4, 4)
    for c in crops:
        y, x = divmod(int(c[0, 0, 0]), 12)
        assert torch.equal(c, regions[0][:, y : y + 4, x : x + 4])
    assert torch.equal(crops, random_crops(np.random.default_rng(0), regions, 5, 4))


@pytest.mark.parametrize(("call", "match"), [
    (lambda: load_inpainting_split(4), r"load_inpainting_split: patch_size: expected an int >= 8, got 4"),
    (lambda: load_inpainting_split(32, train_fraction=1.0), r"expected train_fraction in \(0, 1\), got 1.0"),
    (lambda: load_inpainting_split(400, train_fraction=0.5), r"patch_size=400 does not fit both regions"),
    (lambda: random_masks(np.random.default_rng(0), 2, 2), r"random_masks: size: expected an int >= 4, got 2"),
    (lambda: random_masks(np.random.default_rng(0), -1, 8), r"random_masks: n: expected an int >= 0, got -1"),
])
def test_bad_arguments(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]
