"""The work behind ``normlab convert``: loading the source, the verification text, running one operation, checking
the result against the original and saving it (see :mod:`normlab.cli.convert`)."""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXACT_OPS = ("rms_norm", "crms_norm", "fold-ln")
EXACT_TOL = 2e-5  # relative to the largest |output| (float32 rounding through a deep model)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


class ConvertError(Exception):
    """Bad input: reported with exit status 2, nothing written."""


@dataclass
class Source:
    """The loaded source: model, tokenizer (or ``None``) and the batches the verification and fine-tuning use."""

    path: Path
    model: nn.Module
    kind: str  # "hf" (a Hugging Face directory) or "normlab"
    tokenizer: Any
    verify_batches: list[dict[str, Tensor]]
    train_docs: list[str] | None
    text_info: dict[str, Any]
    model_type: str | None = None

    def describe(self) -> str:
        return f"{type(self.model).__name__} (model_type={self.model_type!r}, {self.kind} directory)"


def _hf_load(path: Path) -> tuple[nn.Module, Any, str | None]:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the hf extra is installed in CI
        raise ConvertError(f"reading a Hugging Face directory needs transformers: {exc}") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # stderr carries the command's own progress and errors
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        raise ConvertError(f"unknown model type in {path / 'config.json'}: {exc}") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    try:
        model = (cls or transformers.AutoModel).from_pretrained(path).eval()
    except (ValueError, KeyError, OSError) as exc:
        raise ConvertError(f"cannot load the model in {path}: {exc}") from None
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, getattr(config, "model_type", None)


def _documents(args: argparse.Namespace) -> tuple[list[str], list[str], dict[str, Any]]:
    if args.text is not None:
        docs = [line.strip() for line in args.text.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not docs:
            raise ConvertError(f"--text {args.text} has no non-empty line")
        return docs, docs, {"source": f"file {args.text}", "documents": len(docs)}
    from normlab.data import stdlib_docstrings

    n = max(4 * args.batch, 32)
    val = stdlib_docstrings("val", count=n)
    train = stdlib_docstrings("train", count=2000) if args.to == "remove-ln" else []
    return train, val, {"source": "stdlib docstrings (held-out files)", "documents": len(val)}


def _encode(tokenizer: Any, docs: list[str], args: argparse.Namespace) -> list[dict[str, Tensor]]:
    out = []
    for i in range(0, len(docs), args.batch):
        enc = tokenizer(docs[i : i + args.batch], padding=True, truncation=True, max_length=args.seq_len,
                        return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def _vocab_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "vocab_size", None)
    if isinstance(size, int):
        return size
    emb = getattr(model, "get_input_embeddings", lambda: None)() or getattr(model, "embed", None)
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    raise ConvertError(f"cannot tell the vocabulary size of {type(model).__name__} to draw token ids")


def load_source(path: Path, args: argparse.Namespace) -> Source:
    from normlab.surgery.io import MANIFEST, load, read_manifest

    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        model, tokenizer = load(path), None
        kind = "hf" if manifest["format"] == "hf" else "normlab"
        model_type = manifest.get("model_type")
        if (path / "config.json").is_file() and any((path / f).is_file() for f in _TOKENIZER_FILES):
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    elif (path / "config.json").is_file():
        model, tokenizer, model_type = _hf_load(path)
        kind = "hf"
    else:
        raise ConvertError(f"{path} has neither config.json (Hugging Face) nor {MANIFEST} (normlab)")
    if tokenizer is not None:
        train_docs, val_docs, info = _documents(args)
        batches = _encode(tokenizer, val_docs, args)[:4]
    else:
        gen = torch.Generator().manual_seed(0)
        vocab = _vocab_size(model)
        batches = [{"input_ids": torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen),
                    "attention_mask": torch.ones(args.batch, args.seq_len, dtype=torch.long)} for _ in range(2)]
        train_docs, info = None, {"source": "random token ids (no tokenizer)", "seed": 0, "vocab_size": vocab}
    return Source(path, model, kind, tokenizer, batches, train_docs, info, model_type)


def forward(model: nn.Module, batch: dict[str, Tensor]) -> Any:
    """Call a Hugging Face model with ``input_ids``/``attention_mask``; a normlab model with the ids (and mask)."""
    if type(model).__module__.startswith("transformers."):
        return model(**batch)
    return model(batch["input_ids"], attention_mask=batch["attention_mask"])


def output_tensor(out: Any) -> tuple[str, Tensor]:
    """``("logits", ...)`` or ``("last_hidden_state", ...)`` of a model output."""
    for name in ("logits", "last_hidden_state"):
        t = getattr(out, name, None)
        if isinstance(t, Tensor):
            return name, t
    if isinstance(out, Tensor):
        return "output", out
    raise ConvertError(f"cannot find logits or last_hidden_state in a {type(out).__name__}")


@dataclass
class OpResult:
    """A finished operation: the model, what changed, and how it is written."""

    op: str
    model: nn.Module
    format: str  # "hf" or "normlab"
    changes: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    logprobs: bool = False  # compare log-probabilities (fold-ln centres the unembedding)
    exact: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    reference: nn.Module | None = None  # what the result must equal exactly (remove-ln: the fixed-scale model)
    source: Source | None = None

    def save(self, out: Path, check: dict[str, Any]) -> Path:
        from normlab.surgery.io import save

        assert self.source is not None
        src = self.source
        manifest = {
            "op": self.op, "source": str(src.path), "source_format": src.kind, "model_type": src.model_type,
            "changes": [str(c) for c in self.changes], "notes": self.notes, "verification": check,
            "text": src.text_info,
        } | ({"finetune": self.extra} if self.extra else {})
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            save(self.model, tmp, manifest=manifest, hf=self.format == "hf")
            if src.tokenizer is not None:
                src.tokenizer.save_pretrained(tmp)
            cfg = getattr(self.model, "config", None)
            if self.format == "normlab" and callable(getattr(cfg, "save_pretrained", None)):
                cfg.save_pretrained(tmp)  # type: ignore[union-attr]  # the original config, for reference
            os.rename(tmp, out)  # fails if out appeared meanwhile: never overwritten
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"cannot create {out}: {exc}") from None
        return out


def _report_result(op: str, report: Any, fmt: str, **kw: Any) -> OpResult:
    return OpResult(op, report.model, fmt, list(report.changes), list(report.notes), **kw)


def run_op(model: nn.Module, src: Source, args: argparse.Namespace) -> OpResult:
    from normlab import surgery

    op = args.to
    hf_ok = src.kind == "hf"
    try:
        if op in ("rms_norm", "crms_norm"):
            conv = surgery.convert_to_rms_norm if op == "rms_norm" else surgery.convert_to_crms_norm
            result = _report_result(op, conv(model, inplace=True), "normlab")
        elif op == "fold-ln":
            result = _report_result(op, surgery.fold_ln(model, keep_ln_params=True, inplace=True),
                                    "hf" if hf_ok else "normlab", logprobs=True)
        elif op == "remove-ln":
            from normlab.cli._convert_remove import remove_ln

            result = remove_ln(model, src, args)
        else:
            result = _swap(model, op, src)
    except (TypeError, ValueError) as exc:
        raise ConvertError(str(exc)) from None
    result.source = src
    return result


def _swap(model: nn.Module, op: str, src: Source) -> OpResult:
    from normlab import surgery
    from normlab.registry import get_norm

    try:
        spec = get_norm(op)
    except KeyError:
        raise ConvertError(
            f"unknown --to {op!r}: expected rms_norm, crms_norm, fold-ln, remove-ln or a registry norm (normlab ls)"
        ) from None
    swap = getattr(surgery, "swap_norms", None)
    if swap is None:
        raise ConvertError(f"--to {spec.name} needs normlab.surgery.swap_norms, which this normlab does not have")
    report = swap(model, spec.name, batches=[dict(b) for b in src.verify_batches], forward=forward)
    return OpResult(spec.name, getattr(report, "model", model), "normlab", list(getattr(report, "swaps", [])),
                    exact=False)


def _valid(t: Tensor, batch: dict[str, Tensor]) -> Tensor:
    mask = batch["attention_mask"].bool()
    return t[mask] if tuple(mask.shape) == tuple(t.shape[:2]) else t


@torch.no_grad()
def max_delta(a: nn.Module, b: nn.Module, batches: list[dict[str, Tensor]], logprobs: bool) -> tuple[str, float, float]:
    """``(what, max |Δ|, max |a|)`` over the valid tokens of ``batches``."""
    delta, scale, name = 0.0, 0.0, ""
    for batch in batches:
        name, ya = output_tensor(forward(a, batch))
        _, yb = output_tensor(forward(b, batch))
        ya, yb = _valid(ya.double(), batch), _valid(yb.double(), batch)
        if logprobs:
            ya, yb = ya.log_softmax(-1), yb.log_softmax(-1)
        delta = max(delta, float((ya - yb).abs().max()))
        scale = max(scale, float(ya.abs().max()))
    return ("log-probs" if logprobs else name), delta, scale


def verify(original: nn.Module, result: OpResult, src: Source) -> dict[str, Any]:
    batches = src.verify_batches
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    what, delta, scale = max_delta(original, result.model, batches, result.logprobs)
    check: dict[str, Any] = {"tokens": tokens, "max_abs_delta": delta, "max_abs_reference": scale}
    if result.exact:
        tol = EXACT_TOL * max(1.0, scale)
        check |= {"check": f"{what} of the result vs the original", "tolerance": tol, "ok": delta <= tol}
        return check
    check |= {"check": f"{what} of the result vs the original (not an exact operation: quality, not pass/fail)",
              "ok": True}
    if result.reference is not None:
        what_r, d_r, s_r = max_delta(result.reference, result.model, batches, False)
        tol = 1e-3 * max(1.0, s_r)
        check["extra"] = {"export check": f"max |Δ {what_r}| vs the fine-tuned fixed-scale model = {d_r:.3g} "
                                          f"(tolerance {tol:.3g})"}
        check |= {"export_max_abs_delta": d_r, "export_tolerance": tol, "ok": d_r <= tol}
    return check


def cycle(batches: list[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    while True:
        yield from batches


def distill_loss(teacher: nn.Module) -> Any:
    """KL to the teacher's next-token distribution (models with logits) or the relative MSE of the last hidden states
    plus ``1 − cos`` of the mean-pooled embeddings (encoders), over valid tokens."""

    def loss(student: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            name, target = output_tensor(forward(teacher, batch))
        _, out = output_tensor(forward(student, batch))
        mask = batch["attention_mask"].bool()
        if name == "logits":
            return F.kl_div(out[mask].log_softmax(-1), target[mask].log_softmax(-1), log_target=True,
                            reduction="batchmean")
        m = mask.unsqueeze(-1).to(out.dtype)
        mse = (((out - target) ** 2) * m).sum() / (m.sum() * out.shape[-1]) / target.pow(2).mean()
        pooled, pooled_t = ((t * m).sum(1) / m.sum(1) for t in (out, target))
        return mse + (1 - F.cosine_similarity(pooled, pooled_t)).mean()

    return loss
