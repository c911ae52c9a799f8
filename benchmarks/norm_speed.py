"""CPU speed of every registered norm on each of its backends next to torch's own ops and the memory limits,
forward and forward+backward, float32 and bfloat16.

Each norm with fused kernels runs twice, ``backend`` ``cpu`` (``impl="cpu"``) and ``composite``; the fused residual
add + norm ops (``add_rms_norm``, ``add_layer_norm``: two tensors in, two out) are timed too. The limits (backend
``limit``, forward only): ``clone`` allocates and writes a copy of the input, ``copy_`` writes into an existing tensor;
an op that returns a new tensor cannot beat ``clone``.

Interleaved: every repetition runs each variant once, round-robin, so drift on a shared machine hits all
variants alike. Rows are long-format JSONL with p20/p50/p80 (ms) and per-repetition ratios (p20/p50/p80) to
``torch.nn.LayerNorm`` at the same shape, dtype and pass, to the variant's ``baseline`` (``torch.nn.BatchNorm1d`` for
the batch-statistic norms) and, for forwards, to ``clone``; each row also has the machine's 1-minute load after its
shape and dtype. ``env.json`` has versions, threads, the kernel build and the load at the start. The printed table
gives each variant's p50 and those ratios.

    python benchmarks/norm_speed.py                  # the three shapes of the issue
    python benchmarks/norm_speed.py --quick          # a smoke run on a small shape
    python benchmarks/norm_speed.py --only group_norm,instance_norm   # those norms, their torch twins, the bases
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
import _common as bench  # noqa: E402  (before torch: it sets OMP_WAIT_POLICY, see there)
import torch  # noqa: E402
from torch import nn  # noqa: E402

import normlab  # noqa: E402
from normlab._io import append_jsonl  # noqa: E402  (the lab's row writer)
from normlab.kernels import ops  # noqa: E402

SHAPES = [(512, 768), (8192, 1024), (2048, 4096)]
QUICK_SHAPES = [(256, 128)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("fwd", "fwd+bwd")
LN, BN = "torch.LayerNorm", "torch.BatchNorm1d"


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
    backend: str = "composite"  # "cpu" / "composite" (normlab), "torch", "limit"
    baseline: str = LN  # the torch op its ratio_to_baseline is taken against
    passes: tuple[str, ...] = PASSES


class _Clone(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class _CopyInto(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out is None or self.out.shape != x.shape or self.out.dtype != x.dtype:
            self.out = torch.empty_like(x)
        return self.out.copy_(x)


class _AddNorm(nn.Module):
    """``y, h = op(x, residual)``; returns ``y`` in a forward and ``y + h`` when gradients flow, so both outputs reach
    the loss (that extra add is timed too)."""

    def __init__(self, op: Callable[..., tuple[torch.Tensor, torch.Tensor]], c: int, dtype: torch.dtype,
                 impl: str) -> None:
        super().__init__()
        self.op, self.c, self.impl = op, c, impl
        self.weight = nn.Parameter(torch.ones(c, dtype=dtype))
        self.residual: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual is None or self.residual.shape != x.shape:
            self.residual = torch.randn(x.shape).to(x.dtype)
        y, h = self.op(x, self.residual, self.c, self.weight, impl=self.impl)
        return y + h if torch.is_grad_enabled() else y


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()  # (1, T, C) -> (1, C, T)


def _variants(c: int, dtype: torch.dtype = torch.float32) -> list[Variant]:
    tokens = lambda x: x  # noqa: E731 - (1, T, C) token layout
    from_cf = lambda y: y.transpose(1, 2)  # noqa: E731
    out: list[Variant] = [Variant("clone", _Clone(), tokens, backend="limit", passes=("fwd",)),
                          Variant("copy_", _CopyInto(), tokens, backend="limit", passes=("fwd",))]
    # Channel-first-only norms (the conv-net norms) time the same values as a (1, C, T, 1) feature map.
    as_map = lambda x: x.transpose(1, 2).unsqueeze(-1).contiguous()  # noqa: E731
    from_map = lambda y: y.squeeze(-1).transpose(1, 2)  # noqa: E731
    for spec in normlab.list_norms():
        baseline = BN if spec.batch_dependent else LN
        channel_first = spec.layout == "channel_first"
        backends = ("cpu", "composite") if getattr(spec.cls, "kernel_op", None) else (None,)
        for impl in backends:
            kw: dict[str, object] = {"impl": impl} if impl else {}
            if not channel_first:
                kw["channel_dim"] = -1
            try:
                m = spec.cls(c, dtype=dtype, **kw)
            except Exception as exc:  # a norm that cannot take token tensors is reported as an error row, not hidden
                out.append(Variant(spec.name, None, tokens, error=f"{type(exc).__name__}: {exc}", baseline=baseline))
                continue
            layout = (as_map, from_map) if channel_first else (tokens,)
            out.append(Variant(spec.name, m, *layout, backend=impl or "composite", baseline=baseline))
    for impl in ("cpu", "composite"):
        out += [Variant("add_rms_norm", _AddNorm(ops.add_rms_norm, c, dtype, impl), tokens, backend=impl),
                Variant("add_layer_norm", _AddNorm(ops.add_layer_norm, c, dtype, impl), tokens, backend=impl)]
    groups = normlab.nn.group_norm.default_num_groups(c)
    # Every torch op computes the same statistics as its normlab counterpart on the same (1, T, C) batch: one
    # sample of T tokens. GroupNorm and InstanceNorm1d therefore get the channel-first (1, C, T) copy (groups of
    # channels over all T tokens), not (T, C), which would make every token its own sample (2026-11-23 audit).
    dt = {"dtype": dtype}
    out += [
        Variant(LN, nn.LayerNorm(c, **dt), tokens, same_as="layer_norm", backend="torch"),
        Variant("torch.RMSNorm", nn.RMSNorm(c, eps=1e-6, **dt), tokens, same_as="rms_norm", backend="torch"),
        Variant(BN, nn.BatchNorm1d(c, **dt), lambda x: x[0], lambda y: y[None], same_as="batch_norm",
                backend="torch", baseline=BN),
        Variant("torch.GroupNorm", nn.GroupNorm(groups, c, **dt), _channels_first, from_cf, same_as="group_norm",
                backend="torch"),
        # The same GroupNorm on the same channel-first tensor: layout-for-layout with torch.GroupNorm.
        Variant("group_norm[channel_dim=1]", normlab.GroupNorm(c, channel_dim=1, **dt), _channels_first, from_cf,
                same_as="group_norm"),
        Variant("torch.InstanceNorm1d", nn.InstanceNorm1d(c, **dt), _channels_first, from_cf,
                same_as="instance_norm", backend="torch"),
    ]
    return out


def _selected(variants: list[Variant], only: set[str] | None) -> list[Variant]:
    """The variants named in ``only`` (by name, or by the norm a torch op stands next to) and the ones every ratio is
    taken against (``clone``, ``copy_``, ``torch.LayerNorm`` and the selected variants' baselines); all without it."""
    if only is None:
        return variants
    keep = {id(v) for v in variants if v.name in only or v.same_as in only}
    bases = {"clone", "copy_", LN} | {v.baseline for v in variants if id(v) in keep}
    return [v for v in variants if id(v) in keep or (v.name in bases and v.backend in ("limit", "torch"))]


def _calls(v: Variant, base: torch.Tensor,
           shared: dict[tuple[object, ...], torch.Tensor] | None = None) -> dict[str, Callable[[], object]]:
    """The forward and forward+backward closures of one variant (raises if the variant cannot run). Variants with
    the same input layout share one input, one grad-requiring copy and one incoming gradient through ``shared`` (at
    2048x4096 one tensor is 32 MB and there are ~50 variants)."""
    m = v.module
    assert m is not None
    m.train()
    shared = {} if shared is None else shared
    x = v.make_input(base).detach()
    key = (tuple(x.shape), tuple(x.stride()), x.dtype)
    x = shared.setdefault(("x", *key), x)
    xg = shared.setdefault(("xg", *key), x.clone().requires_grad_(True))
    with torch.no_grad():
        y = m(x)
    grad = shared.setdefault(("grad", tuple(y.shape), y.dtype), torch.randn_like(y))
    del y

    def fwd() -> object:
        with torch.no_grad():
            return m(x)

    def fwd_bwd() -> object:
        m.zero_grad(set_to_none=True)
        xg.grad = None
        m(xg).backward(grad)
        return None

    return {k: f for k, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)) if k in v.passes}


Key = tuple[str, str, str]  # (variant, backend, pass)


def _row(shape: str, dtype: str, key: Key, reps: int, **fields: object) -> dict[str, object]:
    name, backend, passes = key
    return {"shape": shape, "dtype": dtype, "variant": name, "backend": backend, "pass": passes, **fields,
            "reps": reps}


def _torch_key(name: str, passes: str) -> Key:
    return (name, "torch", passes)


def _sample(variants: list[Variant], base: torch.Tensor, reps: int,
            errors: dict[Key, str]) -> tuple[dict[Key, list[float]], dict[Key, int], dict[Key, Variant]]:
    """Build, warm up and time every variant, round-robin; failures go to ``errors`` and the sweep goes on."""
    calls: dict[Key, Callable[[], object]] = {}
    owner: dict[Key, Variant] = {}
    shared: dict[tuple[object, ...], torch.Tensor] = {}
    for v in variants:
        try:
            if v.error is not None:
                raise RuntimeError(v.error)
            fns = _calls(v, base, shared)
        except Exception as exc:
            for passes in v.passes:
                errors[(v.name, v.backend, passes)] = v.error or bench.message(exc)
            continue
        for passes, fn in fns.items():
            calls[(v.name, v.backend, passes)] = fn
            owner[(v.name, v.backend, passes)] = v
    samples, inner = bench.interleaved(calls, reps, 20.0, rotate=False, errors=errors)  # ~20 ms per sample
    return samples, inner, owner


def run(shapes: list[tuple[int, int]], reps: int, out_dir: Path,
        dtypes: dict[str, torch.dtype] | None = None, only: set[str] | None = None) -> list[dict[str, object]]:
    """Time every variant (those :func:`_selected` by ``only``) at every shape and dtype. A variant that fails (to
    build, warm up or run) becomes a row with ``status="error"`` and the message, and the sweep goes on without it."""
    out_dir.mkdir(parents=True, exist_ok=False)
    bench.write_env(out_dir, reps=reps, shapes=shapes, only=sorted(only) if only else None,
                    load_average_at_start=os.getloadavg() if hasattr(os, "getloadavg") else None)
    rows: list[dict[str, object]] = []
    done = 0
    for (t, c), (dname, dtype) in [(sh, d) for sh in shapes for d in (dtypes or DTYPES).items()]:
        shape = f"{t}x{c}"
        errors: dict[Key, str] = {}
        samples, inner, owner = _sample(_selected(_variants(c, dtype), only), torch.randn(1, t, c).to(dtype), reps,
                                        errors)
        load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None  # 1-min load after this group
        for key, ms in samples.items():
            name, backend, passes = key
            baseline = owner[key].baseline
            ln, base = samples.get(_torch_key(LN, passes)), samples.get(_torch_key(baseline, passes))
            clone = samples.get(("clone", "limit", "fwd")) if passes == "fwd" else None
            rows.append(_row(
                shape, dname, key, reps, **bench.summary(ms, "{p}_ms", 4),
                **bench.ratio_summary(ms, ln, "ratio_to_torch_layernorm_{p}", 3), baseline=baseline,
                **bench.ratio_summary(ms, base, "ratio_to_baseline_{p}", 3),
                **bench.ratio_summary(ms, clone, "ratio_to_clone_{p}", 3),
                inner=inner[key], load_1min=load, status="ok",
            ))
        for key, msg in errors.items():
            print(f"error {shape} {dname} {key}: {msg}", file=sys.stderr)
            rows.append(_row(shape, dname, key, reps, status="error", error=msg))
        append_jsonl(out_dir / "rows.jsonl", rows[done:])  # per group: a run cut short keeps what it measured
        done = len(rows)
        print(f"done {shape} {dname}", file=sys.stderr)
    return rows


def _fmt3(r: dict[str, object], prefix: str) -> str:
    if r.get(f"{prefix}_p50") is None:
        return "-"
    return "/".join(f"{r[f'{prefix}_p{q}']:.2f}" for q in (20, 50, 80))


def format_table(rows: list[dict[str, object]]) -> str:
    lines = [
        f"{'shape':<10} {'dtype':<5} {'variant':<26} {'backend':<9} {'pass':<8} {'p50 ms':>9} "
        f"{'x torch LN p20/p50/p80':>23} {'x torch BN1d p20/p50/p80':>25} {'x clone p20/p50/p80':>20}",
    ]
    for r in rows:
        head = f"{r['shape']:<10} {r.get('dtype', '-'):<5} {r['variant']:<26} {r['backend']:<9} {r['pass']:<8}"
        if r["status"] != "ok":
            lines.append(f"{head} error: {r['error']}")
            continue
        bn = _fmt3(r, "ratio_to_baseline") if r.get("baseline") == BN else "-"
        lines.append(f"{head} {r['p50_ms']:>9.3f} {_fmt3(r, 'ratio_to_torch_layernorm'):>23} {bn:>25} "
                     f"{_fmt3(r, 'ratio_to_clone'):>20}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = bench.parser(__doc__, quick="one small shape, 3 repetitions")
    p.add_argument("--only", default=None, help="comma-separated norm names: time those (and the ratio bases) only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or bench.default_out("norm_speed")
    only = {n.strip() for n in args.only.split(",") if n.strip()} if args.only else None
    rows = run(QUICK_SHAPES if args.quick else SHAPES, 3 if args.quick else args.reps, out, only=only)
    table = format_table(rows)
    (out / "table.txt").write_text(table + "\n")
    print(table)
    print(f"\nrows: {out / 'rows.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
