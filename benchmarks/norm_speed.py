"""CPU speed of every registered norm next to torch's own op, forward and forward+backward.

Interleaved: every repetition runs each variant once, round-robin, so drift on a shared machine hits all
variants alike. Rows are long-format JSONL with p20/p50/p80 (ms), plus ``env.json``; the printed table
gives each variant's p50 and its ratio to ``torch.nn.LayerNorm`` at the same shape and pass.

    python benchmarks/norm_speed.py                  # the three shapes of the issue
    python benchmarks/norm_speed.py --quick          # a smoke run on a small shape
"""

from __future__ import annotations

import argparse
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
from normlab._env import collect_env  # noqa: E402
from normlab._io import append_jsonl, atomic_write_json  # noqa: E402  (the lab's row and env.json writers)

SHAPES = [(512, 768), (8192, 1024), (2048, 4096)]
QUICK_SHAPES = [(256, 128)]


@dataclass
class Variant:
    """One timed op. ``make_input`` maps the shared ``(1, T, C)`` token tensor to the op's layout and ``to_tokens``
    maps its output back, so a torch op and its normlab counterpart (``same_as``) can be checked to compute the
    same thing. ``error`` is set (and ``module`` ``None``) when the op could not even be built."""

    name: str
    module: nn.Module | None
    make_input: Callable[[torch.Tensor], torch.Tensor]
    to_tokens: Callable[[torch.Tensor], torch.Tensor] = lambda y: y
    same_as: str | None = None
    error: str | None = None


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()  # (1, T, C) -> (1, C, T)


def _variants(c: int) -> list[Variant]:
    tokens = lambda x: x  # noqa: E731 - (1, T, C) token layout
    from_cf = lambda y: y.transpose(1, 2)  # noqa: E731
    out: list[Variant] = []
    # Channel-first-only norms (the conv-net norms) time the same values as a (1, C, T, 1) feature map.
    as_map = lambda x: x.transpose(1, 2).unsqueeze(-1).contiguous()  # noqa: E731
    from_map = lambda y: y.squeeze(-1).transpose(1, 2)  # noqa: E731
    for spec in normlab.list_norms():
        channel_first = spec.layout == "channel_first"
        try:
            m = spec.cls(c) if channel_first else spec.cls(c, channel_dim=-1)
        except Exception as exc:  # a norm that cannot take token tensors is reported as an error row, not hidden
            out.append(Variant(spec.name, None, tokens, error=f"{type(exc).__name__}: {exc}"))
            continue
        out.append(Variant(spec.name, m, as_map, from_map) if channel_first else Variant(spec.name, m, tokens))
    groups = normlab.nn.group_norm.default_num_groups(c)
    # Every torch op computes the same statistics as its normlab counterpart on the same (1, T, C) batch: one
    # sample of T tokens. GroupNorm and InstanceNorm1d therefore get the channel-first (1, C, T) copy (groups of
    # channels over all T tokens), not (T, C), which would make every token its own sample (2026-11-23 audit).
    out += [
        Variant("torch.LayerNorm", nn.LayerNorm(c), tokens, same_as="layer_norm"),
        Variant("torch.RMSNorm", nn.RMSNorm(c, eps=1e-6), tokens, same_as="rms_norm"),
        Variant("torch.BatchNorm1d", nn.BatchNorm1d(c), lambda x: x[0], lambda y: y[None], same_as="batch_norm"),
        Variant("torch.GroupNorm", nn.GroupNorm(groups, c), _channels_first, from_cf, same_as="group_norm"),
        # The same GroupNorm on the same channel-first tensor: layout-for-layout with torch.GroupNorm.
        Variant("group_norm[channel_dim=1]", normlab.GroupNorm(c, channel_dim=1), _channels_first, from_cf,
                same_as="group_norm"),
        Variant("torch.InstanceNorm1d", nn.InstanceNorm1d(c), _channels_first, from_cf, same_as="instance_norm"),
    ]
    return out


def _time(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _calls(v: Variant, base: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The forward and forward+backward closures of one variant (raises if the variant cannot run)."""
    m = v.module
    assert m is not None
    m.train()
    x = v.make_input(base).detach()
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        grad = torch.randn_like(m(x))

    def fwd() -> object:
        with torch.no_grad():
            return m(x)

    def fwd_bwd() -> object:
        m.zero_grad(set_to_none=True)
        xg.grad = None
        m(xg).backward(grad)
        return None

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _row(shape: str, name: str, passes: str, reps: int, **fields: object) -> dict[str, object]:
    return {"shape": shape, "variant": name, "pass": passes, **fields, "reps": reps}


def run(shapes: list[tuple[int, int]], reps: int, out_dir: Path) -> list[dict[str, object]]:
    """Time every variant at every shape. A variant that fails (to build, warm up or run) becomes a row with
    ``status="error"`` and the message, and the sweep goes on without it."""
    out_dir.mkdir(parents=True, exist_ok=False)
    env = collect_env() | {"argv": sys.argv, "reps": reps, "shapes": shapes, "threads": torch.get_num_threads()}
    env["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    atomic_write_json(out_dir / "env.json", env)
    rows: list[dict[str, object]] = []
    for t, c in shapes:
        shape = f"{t}x{c}"
        base = torch.randn(1, t, c)
        calls: dict[tuple[str, str], Callable[[], object]] = {}
        errors: dict[tuple[str, str], str] = {}
        for v in _variants(c):
            try:
                if v.error is not None:
                    raise RuntimeError(v.error)
                fns = _calls(v, base)
            except Exception as exc:
                for passes in ("fwd", "fwd+bwd"):
                    errors[(v.name, passes)] = v.error or _message(exc)
                continue
            calls.update({(v.name, passes): fn for passes, fn in fns.items()})
        # Warm up and pick an inner count so a sample lasts ~20 ms.
        inner: dict[tuple[str, str], int] = {}
        for key, fn in list(calls.items()):
            try:
                fn()
                inner[key] = max(1, int(20.0 / max(_time(fn, 1), 1e-3)))
            except Exception as exc:
                errors[key] = _message(exc)
                del calls[key]
        samples: dict[tuple[str, str], list[float]] = {k: [] for k in calls}
        for _ in range(reps):
            for key, fn in list(calls.items()):
                try:
                    samples[key].append(_time(fn, inner[key]))
                except Exception as exc:
                    errors[key] = _message(exc)
                    del calls[key], samples[key]
        for (name, passes), ms in samples.items():
            p20, p50, p80 = np.percentile(ms, [20, 50, 80])
            ratios: dict[str, float | None] = {f"ratio_to_torch_layernorm_p{q}": None for q in (20, 50, 80)}
            if ("torch.LayerNorm", passes) in samples:
                ln = np.array(samples[("torch.LayerNorm", passes)])
                ratio = np.array(ms) / ln  # per-repetition ratio: both were measured in the same round
                for q in (20, 50, 80):
                    ratios[f"ratio_to_torch_layernorm_p{q}"] = round(float(np.percentile(ratio, q)), 3)
            rows.append(
                _row(
                    shape, name, passes, reps, p20_ms=round(float(p20), 4), p50_ms=round(float(p50), 4),
                    p80_ms=round(float(p80), 4), **ratios, inner=inner[(name, passes)], status="ok",
                )
            )
        for (name, passes), msg in errors.items():
            print(f"error {shape} {name} {passes}: {msg}", file=sys.stderr)
            rows.append(_row(shape, name, passes, reps, status="error", error=msg))
    append_jsonl(out_dir / "rows.jsonl", rows)
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    lines = [
        f"{'shape':<10} {'variant':<26} {'pass':<8} {'p50 ms':>9} {'x torch LN (p20/p50/p80)':>26}",
    ]
    for r in rows:
        head = f"{r['shape']:<10} {r['variant']:<26} {r['pass']:<8}"
        if r["status"] != "ok":
            lines.append(f"{head} error: {r['error']}")
            continue
        if r["ratio_to_torch_layernorm_p50"] is None:
            ratio = "-"
        else:
            ratio = (
                f"{r['ratio_to_torch_layernorm_p20']:.2f}/{r['ratio_to_torch_layernorm_p50']:.2f}/"
                f"{r['ratio_to_torch_layernorm_p80']:.2f}"
            )
        lines.append(f"{head} {r['p50_ms']:>9.3f} {ratio:>26}")
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
