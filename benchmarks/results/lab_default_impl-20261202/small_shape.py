"""The per-call cost at the lab's norm shape (16 x 64 x 128): normlab's fused (impl="cpu") and composite LayerNorm,
RMSNorm and DyT against torch.nn.LayerNorm, 1 thread, 15 interleaved repetitions of 50 calls each."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import normlab

torch.set_num_threads(1)
x = torch.randn(16, 64, 128, requires_grad=True)
g = torch.randn(16, 64, 128)
mods = {
    "torch.LayerNorm": torch.nn.LayerNorm(128),
    "LayerNorm cpu": normlab.LayerNorm(128, impl="cpu"),
    "LayerNorm composite": normlab.LayerNorm(128, impl="composite"),
    "RMSNorm cpu": normlab.RMSNorm(128, impl="cpu"),
    "RMSNorm composite": normlab.RMSNorm(128, impl="composite"),
    "DyT cpu": normlab.DyT(128, impl="cpu"),
    "DyT composite": normlab.DyT(128, impl="composite"),
}


def fwd(m: torch.nn.Module) -> None:
    with torch.no_grad():
        m(x)


def fwd_bwd(m: torch.nn.Module) -> None:
    m(x).backward(g)


passes: dict[str, Callable[[torch.nn.Module], None]] = {"fwd": fwd, "fwd+bwd": fwd_bwd}
res: dict[tuple[str, str], list[float]] = {(k, p): [] for k in mods for p in passes}
for m in mods.values():  # warm-up
    for f in passes.values():
        f(m)
for _ in range(15):
    for k, m in mods.items():
        for p, f in passes.items():
            t0 = time.perf_counter()
            for _ in range(50):
                f(m)
            res[(k, p)].append((time.perf_counter() - t0) / 50 * 1e6)
for (k, p), v in res.items():
    q = statistics.quantiles(v, n=5)
    print(f"{k:22s} {p:8s} p20/p50/p80 us: {q[0]:.0f}/{statistics.median(v):.0f}/{q[3]:.0f}")
