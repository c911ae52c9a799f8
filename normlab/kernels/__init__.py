"""Fast paths for the token norms: ``normlab::`` custom ops with fused CPU kernels.

* :mod:`normlab.kernels.ops`: the norms with :mod:`normlab.functional`'s signatures and an ``impl=`` argument;
* :func:`backends`: which implementation each op runs on a device (for ``normlab env``).

Every op is a :func:`torch.library.custom_op` (forward and backward) with a fake implementation and registered
autograd, so it compiles with ``torch.compile(fullgraph=True)`` and exports with ``torch.export``. The CPU kernels
are C++ (ATen's vectorised types, ``at::parallel_for`` over rows, float32 statistics for float16/bfloat16,
deterministic parameter-gradient reductions), compiled on first use and cached; without a compiler the ops run
their composite implementation and one warning says so. Feature detection lives here only; nothing is read from
the environment at import.
"""

from __future__ import annotations

from normlab.kernels import ops
from normlab.kernels._build import cpu_status

__all__ = ["OPS", "backend_detail", "backends", "ops"]

# Public ops (pRMSNorm and SRMSNorm run through ``rms_norm``; listed for ``normlab env``).
OPS: tuple[str, ...] = (
    "layer_norm",
    "rms_norm",
    "srms_norm",
    "prms_norm",
    "crms_norm",
    "scale_norm",
    "dyt",
    "add_rms_norm",
    "add_layer_norm",
)


def backends(device: str = "cpu") -> dict[str, str]:
    """The implementation ``impl="auto"`` runs for each op on ``device``: ``"cpu"`` (fused C++ kernel) or
    ``"composite"``. Asking about ``"cpu"`` loads (and on first use builds) the kernels."""
    fused = device == "cpu" and cpu_status().available
    return {name: "cpu" if fused else "composite" for name in OPS}


def backend_detail() -> str:
    """One line on the CPU kernels: their instruction set and build directory, or why they are unavailable."""
    return cpu_status().detail
