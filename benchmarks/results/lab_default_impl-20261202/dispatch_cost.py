"""Where the per-call time of the fused LayerNorm goes at the lab's shape (1024 x 128 rows, 1 thread): the C++ kernel
called directly vs through its ``normlab::`` custom op, against torch's own kernels. Median of 7 x 200 calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from normlab.kernels._custom_ops import cpu_extension

torch.set_num_threads(1)
ext = cpu_extension()
x, g, w = torch.randn(1024, 128), torch.randn(1024, 128), torch.ones(128)
mean, rstd = torch.zeros(1024, 1), torch.ones(1024, 1)


def median_us(f: Callable[[], object], n: int = 200) -> float:
    for _ in range(10):
        f()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


cases: dict[str, Callable[[], object]] = {
    "C++ ln_fwd, called directly": lambda: ext.ln_fwd(x, w, w, 1e-5),
    "normlab::layer_norm custom op": lambda: torch.ops.normlab.layer_norm(x, w, w, 1e-5, "cpu"),
    "torch F.layer_norm": lambda: torch.nn.functional.layer_norm(x, (128,), w, w),
    "C++ ln_bwd, called directly": lambda: ext.ln_bwd(g, x, w, None, 1e-5, True, True),
    "normlab::layer_norm_backward custom op": lambda: torch.ops.normlab.layer_norm_backward(
        g, x, w, None, 1e-5, True, True, "cpu"),
    "torch native_layer_norm_backward": lambda: torch.ops.aten.native_layer_norm_backward(
        g, x, [128], mean, rstd, w, w, [True, True, True]),
}
for name, f in cases.items():
    print(f"{name:40s} {median_us(f):7.1f} us")
