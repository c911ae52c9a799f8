"""CPU speed of the fused norm kernels (``normlab.kernels.ops``, ``impl="cpu"``) next to the composite ops, torch's
LayerNorm / RMSNorm and the memory limits (``clone``: allocate and write a copy; ``copy_``: write into an existing
tensor), forward and forward+backward, float32 and bfloat16.

Interleaved: every repetition runs each variant once, round-robin, so drift on a shared machine hits all variants
alike; ratios are taken per repetition against ``torch.LayerNorm`` (same shape, dtype and pass) and, for forwards,
against ``clone``. Rows are long-format JSONL with p20/p50/p80, plus ``env.json`` (versions, threads, kernel build).

    python benchmarks/kernel_speed.py              # the issue's three shapes, 2 threads
    python benchmarks/kernel_speed.py --quick      # a smoke run on one small shape
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Passive OpenMP waiting keeps 2-thread timings comparable on a shared machine (see norm_speed.py); it must be set
# before torch is imported, and env.json records it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from normlab import kernels  # noqa: E402
from normlab.cli.env import collect_env  # noqa: E402
from normlab.kernels import ops  # noqa: E402

SHAPES = [(512, 768), (8192, 1024), (2048, 4096)]
QUICK_SHAPES = [(256, 128)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Fn = Callable[[torch.Tensor], torch.Tensor]


def _norms(c: int, dtype: torch.dtype, impl: str) -> dict[str, Fn]:
    """Each token norm at its modules' defaults, as a function of the (T, C) input."""
    p = lambda v: nn.Parameter(v.to(dtype))  # noqa: E731
    w, b, alpha, scale = p(torch.ones(c)), p(torch.zeros(c)), p(torch.tensor([0.5])), p(torch.tensor([c**0.5]))
    k = -(-c // 16)  # pRMSNorm's p = 6.25%

    def add(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Fn:
        def call(x: torch.Tensor) -> torch.Tensor:
            y, h = fn(x, _RESIDUAL[(x.shape, x.dtype)], c, w, impl=impl)
            return y + h if x.requires_grad else y  # both outputs reach the loss in the backward pass

        return call

    return {
        "layer_norm": lambda x: ops.layer_norm(x, c, w, b, impl=impl),
        "rms_norm": lambda x: ops.rms_norm(x, c, w, impl=impl),
        "srms_norm": lambda x: ops.rms_norm(x, c, impl=impl),
        "prms_norm": lambda x: ops.rms_norm(x, c, w, partial=k, impl=impl),
        "crms_norm": lambda x: ops.crms_norm(x, c, w, impl=impl),
        "scale_norm": lambda x: ops.scale_norm(x, c, scale, impl=impl),
        "dyt": lambda x: ops.dyt(x, c, alpha, w, b, impl=impl),
        "add_rms_norm": add(ops.add_rms_norm),
        "add_layer_norm": add(ops.add_layer_norm),
    }


_RESIDUAL: dict[tuple[torch.Size, torch.dtype], torch.Tensor] = {}


def _variants(c: int, dtype: torch.dtype) -> list[tuple[str, str, Fn]]:
    """(variant, backend, fn) for every timed op at one width and dtype."""
    ln, rms = nn.LayerNorm(c, dtype=dtype), nn.RMSNorm(c, eps=1e-6, dtype=dtype)
    out: list[tuple[str, str, Fn]] = [("torch.LayerNorm", "torch", ln), ("torch.RMSNorm", "torch", rms)]
    for impl in ("cpu", "composite"):
        out += [(name, impl, fn) for name, fn in _norms(c, dtype, impl).items()]
    return out


def _time(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def _calls(t: int, c: int, dtype: torch.dtype) -> dict[tuple[str, str, str], Callable[[], object]]:
    x = torch.randn(t, c).to(dtype)
    _RESIDUAL[(x.shape, x.dtype)] = torch.randn(t, c).to(dtype)
    out = torch.empty_like(x)
    calls: dict[tuple[str, str, str], Callable[[], object]] = {
        ("clone", "limit", "fwd"): lambda: x.clone(),
        ("copy_", "limit", "fwd"): lambda: out.copy_(x),
    }
    xg = x.clone().requires_grad_(True)
    grad = torch.randn(t, c).to(dtype)
    for name, backend, fn in _variants(c, dtype):

        def fwd(fn: Fn = fn) -> object:
            with torch.no_grad():
                return fn(x)

        def fwd_bwd(fn: Fn = fn) -> object:
            xg.grad = None
            fn(xg).backward(grad)
            return None

        calls[(name, backend, "fwd")] = fwd
        calls[(name, backend, "fwd+bwd")] = fwd_bwd
    return calls


def _ratios(ms: list[float], base: list[float] | None, prefix: str) -> dict[str, float | None]:
    if base is None:
        return {f"{prefix}_p{q}": None for q in (20, 50, 80)}
    r = np.array(ms) / np.array(base)  # per repetition: both were measured in the same round
    return {f"{prefix}_p{q}": round(float(np.percentile(r, q)), 3) for q in (20, 50, 80)}


def run(shapes: list[tuple[int, int]], reps: int, out_dir: Path) -> list[dict[str, object]]:
    out_dir.mkdir(parents=True, exist_ok=False)
    env = collect_env() | {"argv": sys.argv, "reps": reps, "shapes": shapes, "threads": torch.get_num_threads(),
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                           "kernels": kernels.backend_detail(), "kernel_backends": kernels.backends(),
                           "note": "shared 2-core machine: absolute times drift; compare ratios"}
    (out_dir / "env.json").write_text(json.dumps(env, indent=2))
    rows: list[dict[str, object]] = []
    for (t, c), (dname, dtype) in [(s, d) for s in shapes for d in DTYPES.items()]:
        calls = _calls(t, c, dtype)
        inner, samples, errors = {}, {}, {}
        for key, fn in list(calls.items()):
            try:
                fn()
                inner[key] = max(1, int(20.0 / max(_time(fn, 1), 1e-3)))
                samples[key] = []
            except Exception as exc:  # a variant that cannot run is a row with its error; the sweep goes on
                errors[key] = f"{type(exc).__name__}: {exc}"
        for _ in range(reps):
            for key in samples:
                samples[key].append(_time(calls[key], inner[key]))
        for key, ms in samples.items():
            name, backend, passes = key
            p20, p50, p80 = np.percentile(ms, [20, 50, 80])
            row: dict[str, object] = {
                "shape": f"{t}x{c}", "dtype": dname, "variant": name, "backend": backend, "pass": passes,
                "p20_ms": round(float(p20), 4), "p50_ms": round(float(p50), 4), "p80_ms": round(float(p80), 4),
                **_ratios(ms, samples.get(("torch.LayerNorm", "torch", passes)), "ratio_to_torch_layernorm"),
                **_ratios(ms, samples.get(("clone", "limit", "fwd")) if passes == "fwd" else None, "ratio_to_clone"),
                "inner": inner[key], "reps": reps, "status": "ok",
            }
            rows.append(row)
        for (name, backend, passes), msg in errors.items():
            rows.append({"shape": f"{t}x{c}", "dtype": dname, "variant": name, "backend": backend, "pass": passes,
                         "status": "error", "error": msg, "reps": reps})
        print(f"done {t}x{c} {dname}", file=sys.stderr)
    with open(out_dir / "rows.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def _fmt3(r: dict[str, object], prefix: str) -> str:
    if r.get(f"{prefix}_p50") is None:
        return "-"
    return "/".join(f"{r[f'{prefix}_p{q}']:.2f}" for q in (20, 50, 80))


def format_table(rows: list[dict[str, object]]) -> str:
    lines = [f"{'shape':<10} {'dtype':<5} {'variant':<16} {'backend':<9} {'pass':<8} {'p50 ms':>9} "
             f"{'x torch LN p20/p50/p80':>23} {'x clone p20/p50/p80':>20}"]
    for r in rows:
        head = f"{r['shape']:<10} {r['dtype']:<5} {r['variant']:<16} {r['backend']:<9} {r['pass']:<8}"
        if r["status"] != "ok":
            lines.append(f"{head} error: {r['error']}")
            continue
        lines.append(f"{head} {r['p50_ms']:>9.3f} {_fmt3(r, 'ratio_to_torch_layernorm'):>23} "
                     f"{_fmt3(r, 'ratio_to_clone'):>20}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--quick", action="store_true", help="one small shape, 3 repetitions")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="result dir (must not exist)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or Path("benchmarks/results") / f"kernel_speed-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = run(QUICK_SHAPES if args.quick else SHAPES, 3 if args.quick else args.reps, out)
    table = format_table(rows)
    (out / "table.txt").write_text(table + "\n")
    print(table)
    print(f"\nrows: {out / 'rows.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
