"""``normlab convert SRC --to OP --out DIR``: norm surgery on a Hugging Face model directory (or a directory written by
``normlab convert`` / ``normlab.surgery.save``), verified on real text and written with a manifest ``normlab.json``
from which ``normlab.surgery.load(DIR)`` rebuilds the model.

Operations: ``rms_norm`` and ``crms_norm`` (the exact Pre-LN conversions), ``fold-ln`` (LayerNorm affines folded
into the readers; still loadable by the original class), ``remove-ln`` (LayerNorm removal by fine-tuning, distilled
against the original on the verification text; exported in the Hugging Face-loadable form unless ``--export fold``),
and any other registry norm (``normlab ls``), which swaps the norms with ``normlab.surgery.swap_norms`` (the names
``rms_norm`` and ``crms_norm`` always mean the exact conversions, never a swap).

Bad input (an unknown model type, a Post-LN model for an exact conversion, float16 weights for the removal export, an
existing ``--out``) is reported with exit status 2 and nothing is written; a verification that fails exits with 1.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

from normlab.cli._convert_ops import EXACT_TOL, ConvertError, Source, load_source, run_op, verify

__all__ = ["add_arguments", "run"]

NAME = "convert"
HELP = "norm surgery on a Hugging Face model directory: rms_norm, crms_norm, fold-ln, remove-ln or a registry norm"

_EPILOG = """examples:
  normlab convert ./gpt2 --to rms_norm --out ./gpt2-rms         exact Pre-LN -> Pre-RMSNorm, verified on stdlib text
  normlab convert ./gpt2 --to fold-ln --out ./gpt2-folded       still a GPT2LMHeadModel (from_pretrained loads it)
  normlab convert ./minilm --to remove-ln --steps 200 --out ./minilm-noln
  normlab convert ./gpt2 --to crms_norm --out x --dry-run        list what would change, write nothing
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = _EPILOG
    p.add_argument("src", type=Path, help="a Hugging Face model directory (config.json) or a normlab model directory")
    p.add_argument("--to", required=True, metavar="OP",
                   help="rms_norm, crms_norm, fold-ln, remove-ln, or a registry norm name (normlab ls)")
    p.add_argument("--out", required=True, type=Path, help="the new directory (must not exist)")
    p.add_argument("--text", type=Path, default=None,
                   help="verification (and remove-ln training) text, one document per line; default: stdlib docstrings")
    p.add_argument("--dry-run", action="store_true", help="list what would change; write nothing")
    p.add_argument("--steps", type=int, default=200, help="remove-ln: fine-tuning steps (default 200)")
    p.add_argument("--lr", type=float, default=1e-4, help="remove-ln: peak learning rate (default 1e-4)")
    p.add_argument("--export", choices=("hf", "fold"), default="hf",
                   help="remove-ln: Hugging Face-loadable form (default) or the fold (a normlab directory)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per verification sequence (default 64)")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar for remove-ln")


def _error(msg: str) -> int:
    print(f"normlab convert: error: {msg}", file=sys.stderr)
    return 2


def _check_args(args: argparse.Namespace) -> None:
    if args.out.exists():
        raise ConvertError(f"--out {args.out} exists; choose a new directory (nothing is ever overwritten)")
    if not args.src.is_dir():
        raise ConvertError(f"SRC {args.src} is not a directory")
    if args.text is not None and not args.text.is_file():
        raise ConvertError(f"--text {args.text} is not a file")
    for name in ("steps", "seq_len", "batch"):
        if getattr(args, name) < 1:
            raise ConvertError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def _print_changes(result: Any, limit: int = 40) -> None:
    changes = [str(c) for c in getattr(result, "changes", [])]
    for line in changes[:limit]:
        print(f"  {line}")
    if len(changes) > limit:
        print(f"  ... {len(changes) - limit} more")
    for note in getattr(result, "notes", []):
        print(f"  note: {note}")


def run(args: argparse.Namespace) -> int:
    try:
        _check_args(args)
        src: Source = load_source(args.src, args)
        print(f"{args.src}: {src.describe()}; verification text: {src.text_info['source']}")
        original = src.model
        result = run_op(copy.deepcopy(original), src, args)
    except ConvertError as exc:
        return _error(str(exc))
    print(f"{result.op}: {len(result.changes)} change(s)")
    _print_changes(result)
    if args.dry_run:
        print(f"dry run: nothing written ({args.out} not created)")
        return 0
    check = verify(original, result, src)
    print(f"verify: {check['check']}: max |Δ| = {check['max_abs_delta']:.3g} on {check['tokens']} tokens of "
          f"{src.text_info['source']}" + (f" (tolerance {check['tolerance']:g})" if "tolerance" in check else ""))
    for key, value in check.get("extra", {}).items():
        print(f"  {key}: {value}")
    if not check["ok"]:
        print(f"normlab convert: verification failed (tolerance {EXACT_TOL:g}); nothing written", file=sys.stderr)
        return 1
    try:
        out = result.save(args.out, check)
    except FileExistsError as exc:
        return _error(str(exc))
    print(f"wrote {out} ({result.format} format; normlab.surgery.load('{out}') rebuilds it)")
    return 0
