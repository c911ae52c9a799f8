"""Inference latency of pre-norm Transformers with LayerNorm, RMSNorm, and UN / PN / RepBN folded by
:func:`normlab.surgery.fold_norms`, next to the same model with every norm folded away as identity (the limit).

Models (CPU, fp32, ``torch.inference_mode()``): a ViT-S-like encoder (d=384, 12 layers, 6 heads, 224px / 16px
patches = 197 tokens, 1000 classes) and a GPT-small-like decoder (d=768, 12 layers, 12 heads, 128 tokens, byte
vocabulary 256 by default so the blocks, not a 50k-row LM head, dominate: ``--vocab 50257`` for GPT-2's).
Batches 1 and 8. Before timing, every batch-statistic norm gets random running statistics and affine parameters
(seeded), and each folded variant's output is checked against the unfolded model on the benchmark input
(``fold_max_rel_err``, max |Δ| / max |y|).

Timing is interleaved: each repetition runs every variant once, in an order rotated every repetition, so drift on a
shared machine hits all variants alike. Ratios are taken per repetition (same round) and then summarised as
p20/p50/p80: ``ratio_to_identity`` (each variant vs the identity limit) and ``layer_norm_over_this`` (how much slower
LayerNorm is than this variant). Each row keeps its raw per-repetition times (``samples_ms``, in repetition order), so
every summary can be recomputed from the row set.

Memory columns: ``param_bytes`` / ``buffer_bytes`` (exact sizes of the model's tensors) and ``peak_alloc_bytes``:
the peak of the CPU allocator's total allocated bytes during one forward, read from ``torch.profiler``'s allocation
records (``profile_memory=True``); it counts every tensor and scratch buffer that goes through c10's allocator
(activations, attention scores, temporaries), not memory that oneDNN/MKL allocate on their own, and not the weights,
which exist before the forward starts. ``null`` if this torch build's profiler does not expose the records.

    python benchmarks/fold_speed.py                 # both models, batch 1 and 8
    python benchmarks/fold_speed.py --quick         # tiny models, 3 repetitions (a smoke run)

The script sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is already set (see ``benchmarks/_common.py``).

Rows (JSONL, long format) and ``env.json`` go to ``--out`` (default ``benchmarks/results/fold_speed-<time>``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
import _common as bench  # noqa: E402  (before torch: it sets OMP_WAIT_POLICY, see there)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from normlab.models import DecoderLM, TransformerConfig, ViTEncoder  # noqa: E402
from normlab.surgery import fold_norms  # noqa: E402

# (variant name, registry norm, fold it?)
VARIANTS = [
    ("layer_norm", "layer_norm", False),
    ("rms_norm", "rms_norm", False),
    ("unified_norm+fold", "unified_norm", True),
    ("power_norm+fold", "power_norm", True),
    ("rep_batch_norm+fold", "rep_batch_norm", True),
    ("identity+fold", "identity", True),
]
LIMIT = "identity+fold"
MODELS: dict[str, dict[str, Any]] = {
    "vit_s": {"arch": "vit", "d_model": 384, "n_layers": 12, "n_heads": 6, "image_size": 224, "patch_size": 16},
    "gpt_small": {"arch": "lm", "d_model": 768, "n_layers": 12, "n_heads": 12, "seq": 128},
}
QUICK_MODELS: dict[str, dict[str, Any]] = {
    "vit_tiny": {"arch": "vit", "d_model": 32, "n_layers": 2, "n_heads": 2, "image_size": 32, "patch_size": 8},
    "gpt_tiny": {"arch": "lm", "d_model": 32, "n_layers": 2, "n_heads": 2, "seq": 16},
}


@dataclass
class Case:
    variant: str
    model: nn.Module | None
    n_folded: int = 0
    fold_err: float | None = None
    error: str | None = None


def _build(spec: dict[str, Any], norm: str, vocab: int) -> tuple[nn.Module, Callable[[int], Tensor], int]:
    kw = {k: v for k, v in spec.items() if k not in ("arch", "seq")}
    if spec["arch"] == "vit":
        cfg = TransformerConfig(norm=norm, placement="pre", num_classes=1000, **kw)
        size = cfg.image_size
        tokens = 1 + (size // cfg.patch_size) ** 2
        images = lambda b: torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))  # noqa: E731
        return ViTEncoder(cfg), images, tokens
    seq = spec["seq"]
    cfg = TransformerConfig(norm=norm, placement="pre", vocab_size=vocab, max_seq_len=seq, **kw)
    return DecoderLM(cfg), lambda b: torch.randint(0, vocab, (b, seq), generator=torch.Generator().manual_seed(1)), seq


@torch.no_grad()
def _randomise_norms(model: nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters, as training would leave (the fold then has work to do)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in [*model.named_buffers(), *model.named_parameters()]:
        if "norm" not in name or not t.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("running_var", "running_phi"):
            t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
        elif leaf in ("running_mean", "bias", "alpha"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        elif leaf == "weight":
            t.copy_(1 + torch.randn(t.shape, generator=g) * 0.1)


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).logits


def _peak_alloc_bytes(model: nn.Module, x: Tensor) -> int | None:
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _forward(model, x)
        peak = 0

        def walk(nodes: Any) -> None:
            nonlocal peak
            for n in nodes:
                if n.typed[0] == _EventType.Allocation:
                    peak = max(peak, int(n.typed[1].total_allocated))
                walk(n.children)

        walk(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
        return peak
    except (ImportError, AttributeError, RuntimeError) as exc:  # private API: degrade to null, say why on stderr
        print(f"peak_alloc_bytes unavailable: {exc}", file=sys.stderr)
        return None


def _cases(spec: dict[str, Any], batch: int, vocab: int) -> tuple[list[Case], Tensor, int]:
    cases: list[Case] = []
    x, tokens = torch.empty(0), 0
    for name, norm, fold in VARIANTS:
        try:
            torch.manual_seed(0)  # the same linear weights in every variant
            model, make_input, tokens = _build(spec, norm, vocab)
            model.eval()
            x = make_input(batch)
            case = Case(name, model)
            if fold:
                _randomise_norms(model, seed=1)
                ref = _forward(model, x)
                report = fold_norms(model)
                case.model, case.n_folded = report.model, len(report.folded)
                out = _forward(case.model, x)
                case.fold_err = float((out - ref).abs().max() / ref.abs().max())
                if not math.isfinite(case.fold_err):  # rows are standard JSON, and a NaN fold is a broken fold
                    raise ValueError(f"the folded model's output is not finite (max rel. error {case.fold_err})")
            cases.append(case)
        except Exception as exc:  # a failing variant becomes an error row; the sweep goes on
            cases.append(Case(name, None, error=f"{type(exc).__name__}: {exc}"))
    return cases, x, tokens


def run_case_set(
    model_name: str, spec: dict[str, Any], batch: int, reps: int, vocab: int, sample_ms: float = 50.0
) -> list[dict[str, Any]]:
    """Time every variant of one (model, batch) interleaved; one row per variant."""
    with torch.inference_mode():
        cases, x, tokens = _cases(spec, batch, vocab)
        ok = {c.variant: c.model for c in cases if c.model is not None}
        calls = {k: (lambda m=m: _forward(m, x)) for k, m in ok.items()}
        samples, inner = bench.interleaved(calls, reps, sample_ms)
        peak = {k: _peak_alloc_bytes(m, x) for k, m in ok.items()}
    rows: list[dict[str, Any]] = []
    base = {"model": model_name, "batch": batch, "tokens": tokens, "device": "cpu", "dtype": "float32"}
    for c in cases:
        if c.model is None:
            rows.append(base | {"variant": c.variant, "status": "error", "error": c.error})
            continue
        ms = np.asarray(samples[c.variant])
        row = base | {"variant": c.variant, "folded": c.variant.endswith("+fold"), "n_folded": c.n_folded}
        row |= bench.summary(ms, "{p}_ms", 4)
        row["samples_ms"] = [round(float(v), 6) for v in ms]
        refs = (("ratio_to_identity", LIMIT, False), ("layer_norm_over_this", "layer_norm", True))
        for key, ref_name, invert in refs:
            if ref_name in samples:
                r = np.asarray(samples[ref_name]) / ms if invert else ms / np.asarray(samples[ref_name])
                row |= bench.summary(r, key + "_{p}", 4)
        row |= {
            "param_bytes": sum(p.numel() * p.element_size() for p in c.model.parameters()),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in c.model.buffers()),
            "peak_alloc_bytes": peak.get(c.variant),
            "fold_max_rel_err": c.fold_err,
            "reps": reps,
            "inner": inner[c.variant],
            "status": "ok",
        }
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'model':<10} {'b':>2} {'variant':<20} {'p20 ms':>9} {'p50 ms':>9} {'p80 ms':>9} "
        f"{'x identity p20/p50/p80':>23} {'LN/this p50':>11} {'peak MB':>8} {'fold err':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['model']:<10} {r['batch']:>2} {r['variant']:<20} ERROR {r['error']}")
            continue
        ratio = f"{r['ratio_to_identity_p20']:.3f}/{r['ratio_to_identity_p50']:.3f}/{r['ratio_to_identity_p80']:.3f}"
        peak = f"{r['peak_alloc_bytes'] / 1e6:.1f}" if r["peak_alloc_bytes"] is not None else "-"
        err = f"{r['fold_max_rel_err']:.1e}" if r["fold_max_rel_err"] is not None else "-"
        lines.append(
            f"{r['model']:<10} {r['batch']:>2} {r['variant']:<20} {r['p20_ms']:>9.2f} {r['p50_ms']:>9.2f} "
            f"{r['p80_ms']:>9.2f} {ratio:>23} {r['layer_norm_over_this_p50']:>11.3f} {peak:>8} {err:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    out, rows = bench.model_sweep(argv, __doc__, "fold_speed", MODELS, QUICK_MODELS, VARIANTS, run_case_set, vocab=256,
                                vocab_help="decoder vocabulary (GPT-2: 50257)")
    print(format_table(rows))
    print(f"\nrows: {out / 'rows.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
