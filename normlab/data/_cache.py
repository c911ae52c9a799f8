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


def temp_name_of(path: Path, name: str) -> bool:
    """Whether ``name`` is one of the temporary files :func:`_atomic_write` makes for ``path``."""
    return name.startswith(path.name + ".") and name.endswith(".tmp")


def _atomic_write(path: Path, write: Callable[[BinaryIO], object], *, exclusive: bool = False) -> None:
    """Write ``path`` through a uniquely named, fsynced temporary file in the same directory: readers never see half
    a file, and concurrent writers (the ranks of a ``torchrun`` job filling the cache) never share a temporary file.

    By default the temporary file replaces ``path`` (``os.replace``: the last writer wins). With ``exclusive=True`` it
    appears by one hard link, which raises ``FileExistsError`` if ``path`` exists, so nothing is ever overwritten; on a
    file system without hard links it falls back to check-then-rename, which is exclusive only under a caller's lock.
    """
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} exists and is never overwritten") from None
        except OSError:
            if path.exists():
                raise FileExistsError(f"{path} exists and is never overwritten") from None
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` at ``path`` atomically (see :func:`_atomic_write`)."""
    _atomic_write(path, lambda f: np.save(f, array))


def atomic_write_text(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically; ``exclusive=True`` never overwrites (see :func:`_atomic_write`)."""
    data = text.encode("utf-8")
    _atomic_write(path, lambda f: f.write(data), exclusive=exclusive)


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
