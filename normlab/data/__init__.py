"""Loaders for real data that is present offline: the Python stdlib source as a byte corpus, scikit-learn's digits
and sample images. Nothing here downloads anything.
"""

from __future__ import annotations

from normlab.data._cache import cache_dir
from normlab.data.images import DigitsSplit, load_digits_split, sample_image_patches
from normlab.data.text import TextCorpus, load_stdlib_corpus, random_windows, stdlib_files, strided_windows

__all__ = [
    "DigitsSplit",
    "TextCorpus",
    "cache_dir",
    "load_digits_split",
    "load_stdlib_corpus",
    "random_windows",
    "sample_image_patches",
    "stdlib_files",
    "strided_windows",
]
