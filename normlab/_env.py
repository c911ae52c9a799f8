"""The environment a result was produced in, and the optional packages normlab can use.

:func:`collect_env` (versions, git SHA, hardware) is what ``normlab env`` prints and what every result bundle records:
a lab run's ``env.json`` and the benchmarks' ``env.json``. :class:`Requirement` declares an optional package that a
data loader needs; the loader (:func:`require`) and ``normlab lab`` before a run (:func:`missing_requirements`) read
the same declaration.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Requirement",
    "collect_env",
    "git_sha",
    "installed_version",
    "missing_requirements",
    "module_available",
    "require",
]

# Optional packages whose version changes lab results (digits data, plots): recorded when installed.
_OPTIONAL = ("scikit-learn", "matplotlib", "triton")


def git_sha(path: Path | None = None) -> str | None:
    """The HEAD SHA of the checkout containing ``path`` (default: this package), with ``-dirty`` when tracked files
    differ from it; ``None`` outside a checkout or without git."""
    where = path or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    if out.returncode != 0 or not sha:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=5, check=False,
    ).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` from its metadata (nothing is imported), or ``None``."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect_env() -> dict[str, Any]:
    """Versions, git SHA and hardware as a dict (used by ``normlab env`` and every result bundle)."""
    import numpy
    import torch

    import normlab

    info: dict[str, Any] = {
        "normlab": normlab.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name in _OPTIONAL:
        version = installed_version(name)
        if version is not None:
            info[name] = version
    info.update(_kernel_info(torch.cuda.is_available()))
    return info


def _kernel_info(cuda: bool) -> dict[str, str]:
    """Which implementation each ``normlab.kernels`` op runs by default (``op=backend``, per device) and the CPU
    kernels' build (loading them, and building them on first use)."""
    from normlab import kernels

    info = {"kernels_cpu": kernels.backend_detail()}
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        info[f"kernel_backends_{device}"] = " ".join(f"{op}={b}" for op, b in kernels.backends(device).items())
    return info


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
