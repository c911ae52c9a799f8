"""Digits split and sample-image patches (scikit-learn's bundled data, no download)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from normlab.data import load_digits_split, sample_image_patches


def test_digits_split_is_deterministic_stratified_and_disjoint() -> None:
    a, b = load_digits_split(), load_digits_split()
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert a.x_train.shape[1:] == (1, 8, 8) and a.x_train.dtype == torch.float32
    assert len(a.y_train) + len(a.y_val) == 1797
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0
    counts = torch.bincount(a.y_val, minlength=10)
    assert int(counts.min()) >= 34  # about 20% of each ~180-sample class
    train_set = {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(a.x_train, a.y_train)}
    overlap = sum(tuple(x.flatten().tolist()) + (int(y),) in train_set for x, y in zip(a.x_val, a.y_val))
    assert overlap <= 2  # the digits set has a couple of exact duplicate images, nothing more
    other = load_digits_split(seed=1)
    assert not torch.equal(other.y_val, a.y_val)


def test_sample_image_patches_shape_and_range() -> None:
    p = sample_image_patches(32)
    assert p.shape == (2 * (427 // 32) * (640 // 32), 3, 32, 32)
    assert p.dtype == torch.float32 and 0.0 <= float(p.min()) and float(p.max()) <= 1.0
    with pytest.raises(ValueError, match="patch_size to be an int >= 1, got 0"):
        sample_image_patches(0)


def test_missing_scikit_learn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'normlab\[data\]'"):
        load_digits_split()
