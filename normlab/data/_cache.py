"""Where normlab caches derived data (``$NORMLAB_CACHE``, else ``~/.cache/normlab``) and how it writes it atomically
(through :func:`normlab._io.atomic_write`, the one atomic writer); and, re-exported from :mod:`normlab._env`, the
optional packages the loaders need (:class:`Requirement`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from normlab._env import Requirement, missing_requirements, module_available, require
from normlab._io import atomic_write, atomic_write_text, temp_name_of

__all__ = [
    "Requirement",
    "atomic_save_npy",
    "atomic_write_text",
    "cache_dir",
    "missing_requirements",
    "module_available",
    "require",
    "temp_name_of",
]


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
    """Save ``array`` as ``.npy`` at ``path`` atomically (see :func:`normlab._io.atomic_write`)."""
    atomic_write(path, lambda f: np.save(f, array))
