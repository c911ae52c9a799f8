"""Digits with corrupted test domains: sizes, dtypes, the split, the domains and the missing-extra error."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from normlab.data import CORRUPTIONS, corrupt, load_digits_split, load_shifted_digits, make_stream
from tests._extras import require


def test_default_digits_are_16px_rgb_uint8_with_a_half_split() -> None:
    require("sklearn", "data")
    d = load_shifted_digits(corruptions=["gaussian_noise", "zoom_blur"], severities=[3, 5])
    assert d.x_train.shape[1:] == d.x_test.shape[1:] == (3, 16, 16) and d.x_train.dtype == torch.uint8
    assert len(d.y_train) + len(d.y_test) == 1797 and abs(len(d.y_test) - 1797 / 2) < 10
    assert torch.equal(d.x_test[:, 0], d.x_test[:, 2])  # grey replicated to RGB
    assert int(d.x_test.max()) == 255 and int(d.x_test.min()) == 0
    assert list(d.domains) == [("gaussian_noise", 3), ("gaussian_noise", 5), ("zoom_blur", 3), ("zoom_blur", 5)]
    for (name, sev), (x, y) in d.domains.items():
        assert torch.equal(y, d.y_test) and x.shape == d.x_test.shape and x.dtype == torch.uint8
        assert torch.equal(x, corrupt(d.x_test, name, sev))
    # the test set is load_digits_split's validation part, enlarged
    split = load_digits_split(val_fraction=0.5)
    assert torch.equal(d.y_test, split.y_val)
    enlarged = torch.nn.functional.interpolate(split.x_val, size=16, mode="bilinear")
    assert torch.equal(d.x_test[:, :1], torch.round(enlarged * 255).to(torch.uint8))


def test_every_corruption_is_a_domain_and_the_domains_shift() -> None:
    require("sklearn", "data")
    d = load_shifted_digits(severities=[5], test_fraction=0.2)
    assert [name for name, _ in d.domains] == list(CORRUPTIONS)
    for (name, _), (x, _) in d.domains.items():
        change = float((x.double() - d.x_test.double()).abs().mean())
        assert change > 1.0, name  # at 16 px even the blurs move the average pixel by over a grey level
    # a Dirichlet stream over a corrupted domain is feasible with the default split (~900 test images)
    full = load_shifted_digits(corruptions=["contrast"], severities=[5])
    stream = make_stream(full.domains, batch_size=64, labels="dirichlet", delta=0.1)
    assert stream.num_samples == len(full.y_test)


def test_grey_and_size_options() -> None:
    require("sklearn", "data")
    g = load_shifted_digits(size=8, channels=1, severities=[1])
    assert g.x_test.shape[1:] == (1, 8, 8) and "saturate" not in {n for n, _ in g.domains}
    assert len(g.domains) == len(CORRUPTIONS) - 1
    # at size 8 the clean images are the digits themselves, rounded to uint8
    split = load_digits_split(val_fraction=0.5)
    assert torch.equal(g.x_test, torch.round(split.x_val * 255).to(torch.uint8))


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"expected size to be an int >= 8, got 4"):
        load_shifted_digits(size=4)
    with pytest.raises(ValueError, match=r"expected channels to be 1 or 3, got 2"):
        load_shifted_digits(channels=2)
    with pytest.raises(ValueError, match=r"bad corruptions \['fog'\]: expected names from gaussian_noise"):
        load_shifted_digits(corruptions=["contrast", "fog"])
    with pytest.raises(ValueError, match=r"bad corruptions \['saturate'\]: saturate needs channels=3"):
        load_shifted_digits(channels=1, corruptions=["saturate"])
    with pytest.raises(ValueError, match=r"expected severities to be ints in 1\.\.5, got \[0, 6\]"):
        load_shifted_digits(severities=[0, 6])


@pytest.mark.parametrize("missing", ["sklearn", "PIL"])
def test_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'normlab\[data\]'"):
        load_shifted_digits(corruptions=["contrast"], severities=[1])
