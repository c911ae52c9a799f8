"""Triton kernels for the token norms: the CUDA implementation of the ``normlab::`` custom ops.

Placeholder module; the kernels follow.
"""

from __future__ import annotations

import functools
import importlib.util

from torch import Tensor

__all__ = ["available", "check_triton"]


@functools.cache
def available() -> bool:
    """Triton is installed (importing it is deferred to the first launch)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    """Triton runs its interpreter (``TRITON_INTERPRET=1``, read by Triton itself), which takes CPU tensors."""
    import triton

    knobs = getattr(triton, "knobs", None)
    return bool(getattr(getattr(knobs, "runtime", None), "interpret", False))


def check_triton(x: Tensor, op: str) -> None:
    """Raise unless the Triton kernels can run on ``x``."""
    if not available():
        raise RuntimeError(f"{op}: impl='triton' needs Triton (pip install 'normlab[gpu]'); it is not installed")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{op}: impl='triton' needs an input on a CUDA device, got an input on {x.device}")
