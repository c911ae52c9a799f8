"""Fast paths for the norms: ``normlab::`` custom ops with fused CPU kernels (C++) and CUDA kernels (Triton).

The token norms (LayerNorm, the RMSNorm family, ScaleNorm, DyT, the fused residual add + norm) have both; the
training step of the batch-statistic norms on token tensors (BatchNorm with padding masks, RepBN, PowerNorm,
UnifiedNorm) and GroupNorm / InstanceNorm on token tensors have CPU kernels, and run their composite op elsewhere
(and across synced ranks).

* :mod:`normlab.kernels.ops`: the norms with :mod:`normlab.functional`'s signatures and an ``impl=`` argument;
* :func:`use_impl`: a context manager choosing the implementation for a scope (as
  ``torch.nn.attention.sdpa_kernel`` does for attention); a module's own ``impl=`` argument wins over it (precedence in
  :mod:`normlab.kernels._scope`); :func:`current_impl` reads it;
* :func:`backends`: which implementation each op runs on a device (for ``normlab env``).

Every op is a :func:`torch.library.custom_op` (forward and backward) with a fake implementation and registered
autograd, so it compiles with ``torch.compile(fullgraph=True)`` and exports with ``torch.export``. The CPU kernels
are C++ (ATen's vectorised types, ``at::parallel_for`` over rows, float32 statistics for float16/bfloat16,
deterministic parameter-gradient reductions), compiled on first use and cached; without a compiler the ops run
their composite implementation and one warning says so. The Triton kernels (:mod:`normlab.kernels._triton`) are the
CUDA implementation of the token-norm ops when Triton is installed. Feature detection lives here only; nothing is
read from the environment at import.
"""

from __future__ import annotations

from normlab.kernels import ops
from normlab.kernels._build import cpu_status
from normlab.kernels._scope import IMPLS, Impl, current_impl, use_impl

__all__ = ["BATCH_OPS", "CPU_ONLY_OPS", "IMPLS", "OPS", "Impl", "backend_detail", "backends", "current_impl", "ops",
           "use_impl"]

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
    "batch_norm",
    "rep_batch_norm",
    "power_norm",
    "unified_norm",
    "group_norm",
    "instance_norm",
)
BATCH_OPS: tuple[str, ...] = ("batch_norm", "rep_batch_norm", "power_norm", "unified_norm")
# Ops with CPU kernels only (no Triton kernel): the batch-statistic ops and GroupNorm / InstanceNorm on token tensors.
CPU_ONLY_OPS: tuple[str, ...] = (*BATCH_OPS, "group_norm", "instance_norm")


def backends(device: str = "cpu") -> dict[str, str]:
    """The implementation ``impl="auto"`` runs for each op on ``device`` outside any :func:`use_impl` scope:
    ``"cpu"`` (fused C++ kernel), ``"triton"`` (CUDA, Triton installed) or ``"composite"``. Asking about ``"cpu"``
    loads (and on first use builds) the kernels."""
    if device == "cpu":
        fused = "cpu" if cpu_status().available else "composite"
    elif device == "cuda":
        from normlab.kernels import _triton

        fused = "triton" if _triton.available() else "composite"
    else:
        fused = "composite"
    return {name: "composite" if name in CPU_ONLY_OPS and fused == "triton" else fused for name in OPS}


def backend_detail() -> str:
    """One line on the CPU kernels: their instruction set and build directory, or why they are unavailable."""
    return cpu_status().detail
