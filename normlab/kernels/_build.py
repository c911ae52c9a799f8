"""Build and load the fused CPU kernels (``csrc/norms.cpp``) on first use.

The extension is compiled with :func:`torch.utils.cpp_extension.load` into
``<cache>/kernels/<torch version>-<cpu capability>-<source hash>`` (``<cache>`` is ``$NORMLAB_CACHE`` or
``~/.cache/normlab``, read when the first kernel is needed, never at import), under an exclusive file lock so two
processes never build the same directory at once; later processes load the cached library. A machine without a
compiler, or any build failure, leaves the CPU kernels unavailable: the ops run their composite implementation and
one ``RuntimeWarning`` per process says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["CpuKernelStatus", "cpu_extension", "cpu_status", "source_files"]

_CSRC = Path(__file__).resolve().parent / "csrc"


class CpuKernelStatus:
    """Outcome of the (single) attempt to load the CPU extension in this process."""

    def __init__(self, module: ModuleType | None, detail: str) -> None:
        self.module = module
        self.detail = detail

    @property
    def available(self) -> bool:
        return self.module is not None


_lock = threading.Lock()
_status: CpuKernelStatus | None = None


def source_files() -> list[Path]:
    return sorted(_CSRC.glob("*.cpp")) + sorted(_CSRC.glob("*.h"))


def _capability() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in ("AVX512", "AVX2") else "DEFAULT"


# Flags that turn on ATen's vectorised types for the CPU the kernels will run on (as inductor's C++ backend does).
_CAP_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mf16c"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}


def _common_flags() -> list[str]:
    """``-O3``, and ``-fopenmp`` when torch's ``at::parallel_for`` is OpenMP: it is a header template whose body is an
    ``omp parallel`` pragma, so without the flag the kernels run on one thread whatever ``torch.set_num_threads``
    says (measured 2026-12-01: the same time with 1 and 2 threads)."""
    return ["-O3", "-fopenmp"] if torch._C.has_openmp else ["-O3"]


def _build_dir(cap: str) -> Path:
    from normlab.data._cache import cache_dir

    digest = hashlib.sha256()
    for f in source_files():
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    digest.update(" ".join(_common_flags() + _CAP_FLAGS[cap]).encode())
    version = torch.__version__.replace("+", "_")
    path = cache_dir() / "kernels" / f"torch{version}-{cap}-{digest.hexdigest()[:16]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (POSIX ``flock``; elsewhere only torch's own build baton)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load() -> CpuKernelStatus:
    from torch.utils import cpp_extension

    cap = _capability()
    build = _build_dir(cap)
    with _file_lock(build / "normlab-build.lock"):
        module = cpp_extension.load(
            name="normlab_cpu_kernels",
            sources=[str(f) for f in source_files() if f.suffix == ".cpp"],
            extra_cflags=[*_common_flags(), *_CAP_FLAGS[cap]],
            extra_ldflags=["-fopenmp"] if torch._C.has_openmp else [],
            build_directory=str(build),
            verbose=False,
        )
    return CpuKernelStatus(module, f"fused C++ ({module.capability()}), built in {build}")


def cpu_status() -> CpuKernelStatus:
    """Load (building if needed) the CPU extension once per process; never raises."""
    global _status
    if _status is not None:
        return _status
    with _lock:
        if _status is None:
            try:
                _status = _load()
            except Exception as exc:  # no compiler, failed build, unloadable library: composite fallback
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                _status = CpuKernelStatus(None, f"unavailable ({reason})")
                warnings.warn(
                    "normlab.kernels: the fused CPU kernels could not be built or loaded, so normlab's norms use "
                    f"their composite PyTorch implementation on CPU (same results, slower). Cause: {reason}",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _status


def cpu_extension() -> ModuleType | None:
    """The loaded extension module, or ``None`` when it is unavailable."""
    return cpu_status().module
