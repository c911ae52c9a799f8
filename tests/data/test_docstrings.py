"""stdlib docstrings: English prose, split by file (held-out docstrings come from other files), deterministic."""

from __future__ import annotations

import pytest

from normlab.data import stdlib_docstrings


def test_docstrings_are_deterministic_cleaned_and_split() -> None:
    train = stdlib_docstrings("train", count=50)
    val = stdlib_docstrings("val", count=20)
    assert len(train) == 50 and len(val) == 20
    assert stdlib_docstrings("val", count=20) == val
    assert not set(train) & set(val)
    for doc in train + val:
        assert 40 <= len(doc) <= 400 and "\n" not in doc and "  " not in doc
    assert len(stdlib_docstrings("train", count=10, max_chars=60)[0]) <= 60


@pytest.mark.parametrize(("kwargs", "match"), [({"split": "test"}, r"expected split 'train' or 'val', got 'test'"),
                                               ({"count": 0}, r"expected count to be an int >= 1, got 0")])
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stdlib_docstrings(**kwargs)  # type: ignore[arg-type]
