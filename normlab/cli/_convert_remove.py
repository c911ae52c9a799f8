"""``normlab convert --to remove-ln``: LayerNorm removal by fine-tuning (Baroni et al. 2025,
https://arxiv.org/abs/2507.02559), distilled against the original model on the verification text's training split."""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from normlab.cli._convert_ops import ConvertError, OpResult, Source, _encode, cycle, distill_loss, forward


def _check_precision(model: nn.Module) -> None:
    low = sorted({str(p.dtype) for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
    if low:
        raise ConvertError(
            f"remove-ln: the model's weights are {', '.join(low)}; the removal export (γ·1e6/σ̄ in the "
            "LayerNorms) overflows float16 and fine-tuning needs float32: convert a float32 copy (model.float())"
        )


def remove_ln(model: nn.Module, src: Source, args: argparse.Namespace) -> OpResult:
    from normlab.lab.progress import ProgressBar
    from normlab.surgery import export_removed_ln, prepare_ln_removal
    from normlab.surgery.ln_finetune import remove_ln_by_finetuning

    _check_precision(model)
    if args.export == "hf" and src.kind != "hf":
        raise ConvertError("remove-ln --export hf needs a Hugging Face source; use --export fold")
    if args.dry_run:
        removal = prepare_ln_removal(model, inplace=True)
        changes = [f"{s.name}: switched to a fixed scale ({s.group})" for s in removal.switches]
        return OpResult("remove-ln", model, "hf", changes, removal.notes, exact=False)
    if src.tokenizer is not None and src.train_docs:
        train = _encode(src.tokenizer, src.train_docs, args)
    else:
        train = src.verify_batches  # random ids: train on them too (the manifest's text says so)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    for m in model.modules():  # distillation: a deterministic student
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    bar = ProgressBar(args.steps, enabled=not args.no_progress)

    def progress(step: int, loss: float, flipped: list[str]) -> None:
        bar.update(1, postfix=f"loss {loss:.4f}" + (f" switched {len(flipped)}" if flipped else ""))

    try:
        run = remove_ln_by_finetuning(model, cycle(train), distill_loss(teacher), steps=args.steps,
                                      calibration=train[:8], lr=args.lr, momentum=0.9, aux_weight=1.0,
                                      aux_where="all", switch_window=(0.3, 0.8), progress=progress,
                                      forward=forward)
    finally:
        bar.close()
    report = export_removed_ln(run.removal, hf=args.export == "hf")
    fmt = "hf" if args.export == "hf" else "normlab"
    extra = {"steps": args.steps, "lr": args.lr, "loss_first": run.losses[0], "loss_last": run.losses[-1],
             "sigma": run.sigma, "switched_at": run.switched_at, "export": args.export,
             "training_batches": len(train)}
    return OpResult("remove-ln", report.model, fmt, list(report.changes), list(report.notes) + run.removal.notes,
                    exact=False, extra=extra, reference=run.removal.model)
