"""Where normlab caches derived data (``$NORMLAB_CACHE``, else ``~/.cache/normlab``) and how it writes it atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["atomic_save_npy", "atomic_write_text", "cache_dir", "require"]


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``override``, else ``$NORMLAB_CACHE``, else ``~/.cache/normlab`` (created if missing)."""
    if override is not None:
        path = Path(override)
    elif os.environ.get("NORMLAB_CACHE"):
        path = Path(os.environ["NORMLAB_CACHE"])
    else:
        path = Path.home() / ".cache" / "normlab"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a uniquely named temporary file in the same directory and ``os.replace``: readers never
    see half a file, and concurrent writers (the ranks of a ``torchrun`` job filling the cache) never share a
    temporary file; the last ``os.replace`` wins with a complete file."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` at ``path`` atomically (see :func:`_atomic_write`)."""
    _atomic_write(path, lambda f: np.save(f, array))


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`_atomic_write`)."""
    data = text.encode("utf-8")
    _atomic_write(path, lambda f: f.write(data))


def require(module: str, extra: str) -> None:
    """Raise ``ImportError`` naming the extra to install when the optional ``module`` is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{module} is needed for this data set; install it with: pip install 'normlab[{extra}]'")
