"""A byte-level text corpus from the Python standard library's source tree, present on every machine with Python.

The ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages``/``dist-packages`` excluded, since they
differ from machine to machine) are read in sorted order of their relative path and split into train / validation
*by file*: a file goes to validation when the SHA-1 of its relative path falls below ``val_fraction``. So a split never
cuts a file, and it does not change when files are added elsewhere in the tree. Files are joined with a ``0`` byte
(which does not occur in Python source) and cached as a ``uint8`` ``.npy`` under :func:`~normlab.data.cache_dir`,
keyed by a fingerprint of the file list (paths, sizes, mtimes), the Python version and the split fraction.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from normlab.data._cache import atomic_save_npy, atomic_write_text, cache_dir

__all__ = ["SEPARATOR", "TextCorpus", "load_stdlib_corpus", "random_windows", "stdlib_files", "strided_windows"]

SEPARATOR = 0  # byte between files
_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[str]:
    """Relative paths (POSIX, sorted) of the ``*.py`` files of the stdlib tree at ``root`` (default: this Python's)."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"stdlib_files: expected root to be a directory, got {str(base)!r}")
    out = []
    for path in base.rglob("*.py"):
        rel = path.relative_to(base)
        if any(part in _EXCLUDED_DIRS for part in rel.parts) or not path.is_file():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def _is_val(rel: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < val_fraction


@dataclass(frozen=True)
class TextCorpus:
    """A byte corpus split by file.

    Attributes:
        train: ``uint8`` array of the training bytes (memory-mapped from the cache).
        val: ``uint8`` array of the validation bytes.
        train_files: relative paths of the training files, in order.
        val_files: relative paths of the validation files, in order.
        root: the directory the files were read from.
    """

    train: np.ndarray
    val: np.ndarray
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    root: str

    vocab_size: int = 256


def load_stdlib_corpus(
    *,
    val_fraction: float = 0.1,
    root: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
) -> TextCorpus:
    """Load (building and caching on first use) the stdlib byte corpus.

    Args:
        val_fraction: share of files (by hash of the relative path) that go to validation, in ``(0, 1)``.
        root: the source tree (default: this interpreter's stdlib directory).
        cache: cache directory (default: :func:`~normlab.data.cache_dir`).

    Returns:
        A :class:`TextCorpus`; its arrays are memory-mapped read-only from the cache.

    Example:
        >>> corpus = load_stdlib_corpus()  # doctest: +SKIP
        >>> corpus.train.dtype, len(corpus.val_files) > 0  # doctest: +SKIP
        (dtype('uint8'), True)
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"load_stdlib_corpus: expected val_fraction in (0, 1), got {val_fraction!r}")
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(base)
    if not files:
        raise FileNotFoundError(f"load_stdlib_corpus: no *.py files under {str(base)!r}")
    fingerprint = hashlib.sha1()
    fingerprint.update(f"v1|{sys.version_info[:3]}|{base.resolve()}|{val_fraction!r}".encode())
    for rel in files:
        st = (base / rel).stat()
        fingerprint.update(f"|{rel}|{st.st_size}|{st.st_mtime_ns}".encode())
    key = fingerprint.hexdigest()[:16]
    folder = cache_dir(cache)
    paths = {split: folder / f"stdlib-{key}-{split}.npy" for split in ("train", "val")}
    index_path = folder / f"stdlib-{key}-files.json"
    val_files = [f for f in files if _is_val(f, val_fraction)]
    train_files = [f for f in files if not _is_val(f, val_fraction)]
    if not train_files or not val_files:
        raise ValueError(
            f"load_stdlib_corpus: val_fraction={val_fraction} leaves an empty split "
            f"({len(train_files)} train / {len(val_files)} validation files)"
        )
    if not all(p.exists() for p in paths.values()) or not index_path.exists():
        for split, names in (("train", train_files), ("val", val_files)):
            chunks: list[bytes] = []
            for rel in names:
                chunks.append((base / rel).read_bytes())
            joined = bytes([SEPARATOR]).join(chunks)
            atomic_save_npy(paths[split], np.frombuffer(joined, dtype=np.uint8))
        atomic_write_text(index_path, json.dumps({"root": str(base), "train": train_files, "val": val_files}))
    return TextCorpus(
        train=np.load(paths["train"], mmap_mode="r"),
        val=np.load(paths["val"], mmap_mode="r"),
        train_files=tuple(train_files),
        val_files=tuple(val_files),
        root=str(base),
    )


def _check_window(name: str, data: np.ndarray, seq_len: int, batch_size: int) -> None:
    for pname, v in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected {pname} to be an int >= 1, got {v!r}")
    if data.ndim != 1 or len(data) <= seq_len:
        raise ValueError(f"{name}: expected a 1-D array longer than seq_len={seq_len}, got shape {data.shape}")


def random_windows(data: np.ndarray, seq_len: int, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len`` bytes at uniformly random offsets drawn from ``rng``.

    Returns:
        A ``(batch_size, seq_len)`` ``int64`` tensor.
    """
    _check_window("random_windows", data, seq_len, batch_size)
    starts = rng.integers(0, len(data) - seq_len, size=batch_size)
    idx = starts[:, None] + np.arange(seq_len)[None, :]
    return torch.from_numpy(np.asarray(data[idx], dtype=np.int64))


def strided_windows(data: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """``count`` windows evenly spaced over ``data``: a fixed validation set that every arm sees identically.

    Returns:
        A ``(count, seq_len)`` ``int64`` tensor.
    """
    _check_window("strided_windows", data, seq_len, count)
    starts = np.linspace(0, len(data) - seq_len - 1, num=count).astype(np.int64)
    idx = starts[:, None] + np.arange(seq_len)[None, :]
    return torch.from_numpy(np.asarray(data[idx], dtype=np.int64))
