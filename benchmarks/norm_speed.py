"""CPU speed of every registered norm next to torch's own op, forward and forward+backward.

Interleaved: every repetition runs each variant once, round-robin, so drift on a shared machine hits all
variants alike. Rows are long-format JSONL with p20/p50/p80 (ms), plus ``env.json``; the printed table
gives each variant's p50 and its ratio to ``torch.nn.LayerNorm`` at the same shape and pass.

    python benchmarks/norm_speed.py                  # the three shapes of the issue
    python benchmarks/norm_speed.py --quick          # a smoke run on a small shape
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# 2026-11-23: with OpenMP's default spin-waiting, 2-thread ops slow down many-fold whenever another
# process holds a core (seen on the shared 2-core machine); passive waiting makes ratios comparable.
# It must be set before torch is imported; env.json records the value in force.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import normlab  # noqa: E402
from normlab.cli.env import collect_env  # noqa: E402

SHAPES = [(512, 768), (8192, 1024), (2048, 4096)]
QUICK_SHAPES = [(256, 128)]


@dataclass
class Variant:
    name: str
    module: nn.Module
    make_input: Callable[[torch.Tensor], torch.Tensor]


def _variants(c: int) -> list[Variant]:
    tokens = lambda x: x  # noqa: E731 - (1, T, C) token layout
    out: list[Variant] = []
    for spec in normlab.list_norms():
        try:
            m = spec.cls(c, channel_dim=-1)
        except (TypeError, ValueError) as exc:  # a norm that cannot take token tensors is reported, not hidden
            print(f"skip {spec.name}: {exc}", file=sys.stderr)
            continue
        out.append(Variant(spec.name, m, tokens))
    out += [
        Variant("torch.LayerNorm", nn.LayerNorm(c), tokens),
        Variant("torch.RMSNorm", nn.RMSNorm(c, eps=1e-6), tokens),
        Variant("torch.BatchNorm1d", nn.BatchNorm1d(c), lambda x: x[0]),
        Variant("torch.GroupNorm", nn.GroupNorm(normlab.nn.group_norm.default_num_groups(c), c), lambda x: x[0]),
        Variant("torch.InstanceNorm1d", nn.InstanceNorm1d(c), lambda x: x.transpose(1, 2).contiguous()),
    ]
    return out


def _time(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def run(shapes: list[tuple[int, int]], reps: int, out_dir: Path) -> list[dict[str, object]]:
    out_dir.mkdir(parents=True, exist_ok=False)
    env = collect_env() | {"argv": sys.argv, "reps": reps, "shapes": shapes, "threads": torch.get_num_threads()}
    env["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    (out_dir / "env.json").write_text(json.dumps(env, indent=2))
    rows: list[dict[str, object]] = []
    for t, c in shapes:
        base = torch.randn(1, t, c)
        variants = _variants(c)
        inputs = {v.name: v.make_input(base).detach() for v in variants}
        grads = {}
        calls: dict[tuple[str, str], Callable[[], object]] = {}
        for v in variants:
            v.module.train()
            x = inputs[v.name]
            xg = x.clone().requires_grad_(True)
            with torch.no_grad():
                grads[v.name] = torch.randn_like(v.module(x))

            def fwd(m: nn.Module = v.module, x: torch.Tensor = x) -> object:
                with torch.no_grad():
                    return m(x)

            def fwd_bwd(m: nn.Module = v.module, x: torch.Tensor = xg, g: torch.Tensor = grads[v.name]) -> object:
                m.zero_grad(set_to_none=True)
                x.grad = None
                m(x).backward(g)
                return None

            calls[(v.name, "fwd")] = fwd
            calls[(v.name, "fwd+bwd")] = fwd_bwd
        # Warm up and pick an inner count so a sample lasts ~20 ms.
        inner = {}
        for key, fn in calls.items():
            fn()
            inner[key] = max(1, int(20.0 / max(_time(fn, 1), 1e-3)))
        samples: dict[tuple[str, str], list[float]] = {k: [] for k in calls}
        for _ in range(reps):
            for key, fn in calls.items():
                samples[key].append(_time(fn, inner[key]))
        for (name, passes), ms in samples.items():
            p20, p50, p80 = np.percentile(ms, [20, 50, 80])
            ln = np.array(samples[("torch.LayerNorm", passes)])
            ratio = np.array(ms) / ln  # per-repetition ratio: both were measured in the same round
            rows.append(
                {
                    "shape": f"{t}x{c}",
                    "variant": name,
                    "pass": passes,
                    "p20_ms": round(float(p20), 4),
                    "p50_ms": round(float(p50), 4),
                    "p80_ms": round(float(p80), 4),
                    "ratio_to_torch_layernorm_p20": round(float(np.percentile(ratio, 20)), 3),
                    "ratio_to_torch_layernorm_p50": round(float(np.percentile(ratio, 50)), 3),
                    "ratio_to_torch_layernorm_p80": round(float(np.percentile(ratio, 80)), 3),
                    "reps": reps,
                    "inner": inner[(name, passes)],
                    "status": "ok",
                }
            )
    with open(out_dir / "rows.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    lines = [
        f"{'shape':<10} {'variant':<22} {'pass':<8} {'p50 ms':>9} {'x torch LN (p20/p50/p80)':>26}",
    ]
    for r in rows:
        ratio = (
            f"{r['ratio_to_torch_layernorm_p20']:.2f}/{r['ratio_to_torch_layernorm_p50']:.2f}/"
            f"{r['ratio_to_torch_layernorm_p80']:.2f}"
        )
        lines.append(f"{r['shape']:<10} {r['variant']:<22} {r['pass']:<8} {r['p50_ms']:>9.3f} {ratio:>26}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="one small shape, 3 repetitions")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="result dir (must not exist)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or Path("benchmarks/results") / f"norm_speed-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = run(QUICK_SHAPES if args.quick else SHAPES, 3 if args.quick else args.reps, out)
    print(format_table(rows))
    print(f"\nrows: {out / 'rows.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
