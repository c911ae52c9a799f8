"""Where normlab caches derived data (``$NORMLAB_CACHE``, else ``~/.cache/normlab``) and how it writes it atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["atomic_save_npy", "cache_dir", "require"]


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


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` through a temporary file and ``os.replace``, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def require(module: str, extra: str) -> None:
    """Raise ``ImportError`` naming the extra to install when the optional ``module`` is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{module} is needed for this data set; install it with: pip install 'normlab[{extra}]'")
