"""Loaders for real data that is present offline: the Python stdlib source as a byte corpus, scikit-learn's digits
and sample images. Nothing here downloads anything.

For test-time adaptation: image corruptions with the CIFAR-10-C constants (:mod:`normlab.data.corruptions`), digits
with corrupted test domains (:mod:`normlab.data.shifted`) and i.i.d. / label-correlated / continual / mixed test
streams (:mod:`normlab.data.streams`).
"""

from __future__ import annotations

from normlab.data._cache import cache_dir
from normlab.data.corruptions import CORRUPTIONS, corrupt
from normlab.data.docstrings import stdlib_docstrings
from normlab.data.images import DigitsSplit, load_digits_split, sample_image_patches
from normlab.data.shifted import ShiftedDigits, load_shifted_digits
from normlab.data.streams import AdaptationStream, StreamBatch, dirichlet_order, make_stream, rotta_order
from normlab.data.text import TextCorpus, load_stdlib_corpus, random_windows, stdlib_files, strided_windows

__all__ = [
    "DigitsSplit",
    "TextCorpus",
    "cache_dir",
    "load_digits_split",
    "load_stdlib_corpus",
    "random_windows",
    "sample_image_patches",
    "stdlib_docstrings",
    "stdlib_files",
    "strided_windows",
    "CORRUPTIONS",
    "AdaptationStream",
    "ShiftedDigits",
    "StreamBatch",
    "corrupt",
    "dirichlet_order",
    "load_shifted_digits",
    "make_stream",
    "rotta_order",
]
