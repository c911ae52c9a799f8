"""Where normlab caches derived data (``$NORMLAB_CACHE``, else ``~/.cache/normlab``) and how it writes it atomically;
and the optional packages the loaders need (:class:`Requirement`)."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = [
    "Requirement",
    "atomic_save_npy",
    "atomic_write_text",
    "cache_dir",
    "missing_requirements",
    "module_available",
    "require",
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


@dataclass(frozen=True)
class Requirement:
    """An optional package a loader needs: its import name, its distribution (what pip installs) and the normlab
    extra that provides it. Loaders declare theirs once (e.g. :data:`normlab.data.images.REQUIREMENTS`); the loader
    itself (:func:`require`) and ``normlab lab`` before a run (:func:`missing_requirements`) both read that."""

    module: str
    distribution: str
    extra: str

    @property
    def install_hint(self) -> str:
        return f"pip install 'normlab[{self.extra}]'"


def module_available(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it. The one availability check of the optional
    packages; tests replace it to simulate a missing one."""
    return importlib.util.find_spec(module) is not None


def missing_requirements(requirements: Iterable[Requirement]) -> list[Requirement]:
    """The entries of ``requirements`` whose module is not installed (nothing is imported)."""
    return [r for r in requirements if not module_available(r.module)]


def require(requirement: Requirement) -> None:
    """Raise ``ImportError`` naming the extra to install when ``requirement``'s module is missing."""
    if missing_requirements([requirement]):
        raise ImportError(
            f"{requirement.distribution} (module {requirement.module!r}) is needed for this data set; install it "
            f"with: {requirement.install_hint}"
        )
