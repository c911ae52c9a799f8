"""fold_norms on normlab's Transformers, proven on real data: outputs before vs after folding agree to <= 1e-5 relative
(fp32) on held-out text (DecoderLM trained a few steps on stdlib source bytes, so running statistics are real) and on
real 8x8 digits (ViTEncoder); the folded model exports with ``torch.export``."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from normlab.models import CNNConfig, DecoderLM, DigitsCNN, TransformerConfig, ViTEncoder
from normlab.models.resnet import ResNet, ResNetConfig
from normlab.nn._base import NormBase
from normlab.registry import get_norm, list_norms
from normlab.surgery import fold_norms, norm_affine
from tests._extras import require

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ = 48
FOLDABLE = [s.name for s in list_norms(foldable=True)]
# A 4-step LayerNorm -> RepBN ramp ends inside the 8 training steps (a mid-ramp fold is tested on its own below).
NORM_KWARGS: dict[str, dict[str, Any]] = {"prep_batch_norm": {"total_steps": 4}}


def _bytes(*rel: str) -> Tensor:
    return torch.tensor(list(b"".join((STDLIB / r).read_bytes() for r in rel)), dtype=torch.long)


TRAIN_TEXT = _bytes("functools.py", "textwrap.py")
HELD_OUT = _bytes("json/decoder.py")  # never trained on


def _windows(data: Tensor, n: int, gen: torch.Generator | None = None) -> Tensor:
    if gen is None:  # evenly spaced, deterministic
        starts = torch.linspace(0, len(data) - SEQ - 1, n).long()
    else:
        starts = torch.randint(0, len(data) - SEQ - 1, (n,), generator=gen)
    return torch.stack([data[s : s + SEQ] for s in starts.tolist()])


def _trained_lm(steps: int = 8, **cfg: Any) -> DecoderLM:
    config = TransformerConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=SEQ, **cfg)
    model = DecoderLM(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = _windows(TRAIN_TEXT, 8, gen)
        loss = model(ids, labels=ids).loss
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _rel(out: Tensor, ref: Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def _logits(model: nn.Module, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("norm", FOLDABLE)
def test_every_foldable_norm_folds_exactly_in_a_trained_pre_norm_lm(norm: str) -> None:
    model = _trained_lm(norm=norm, norm_kwargs=NORM_KWARGS.get(norm, {}))
    spec = get_norm(norm)
    if spec.has_running_stats:  # training moved the statistics: the fold has something to prove
        scale = norm_affine(model.blocks[0].attn_in_norm).scale
        assert (scale - scale.mean()).abs().max() > 1e-3
    ids = _windows(HELD_OUT, 4)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :5] = False  # a left-padded row: eval-mode norms ignore the mask, so the fold still holds
    ref, ref_masked = _logits(model, ids), _logits(model, ids, mask)
    report = fold_norms(model)
    assert report.refused == [] and len(report.folded) == 2 * 2 + 1
    assert not any(isinstance(m, spec.cls) for m in report.model.modules())
    assert _rel(_logits(report.model, ids), ref) <= 1e-5
    assert _rel(_logits(report.model, ids, mask)[mask], ref_masked[mask]) <= 1e-5
    by_norm = {r.norm: r for r in report.folded}
    assert by_norm["blocks.1.attn_in_norm"].targets == tuple(f"blocks.1.attn.{p}_proj" for p in "qkv")
    assert by_norm["final_norm"].targets == ("lm_head",) and model.lm_head.bias is None
    assert isinstance(model.final_norm, spec.cls)  # inplace=False: the trained model keeps its norms


PLACEMENTS = [
    # (config, folded, refused) with batch_norm everywhere
    ({"placement": "peri"}, 9, 0),
    ({"placement": "sandwich", "norm": "rep_batch_norm"}, 9, 0),
    ({"placement": "lns"}, 5, 0),
    ({"placement": "normformer", "norm": "unified_norm"}, 9, 0),
    ({"placement": "pre", "mlp": "swiglu", "norm": "power_norm"}, 5, 0),
    ({"placement": "pre", "qk_norm": "rms", "norm_overrides": {"qk": "batch_norm"}}, 9, 0),
    ({"placement": "pre", "qk_norm": "layer", "qk_norm_per_head": False, "norm_overrides": {"qk": "batch_norm"}}, 9, 0),
    ({"placement": "mix", "mix_alpha": 0.5}, 3, 2),
    ({"placement": "post"}, 1, 4),
    ({"placement": "deepnorm"}, 1, 4),
    ({"placement": "peri", "norm": "power_norm"}, 5, 4),
]


@pytest.mark.parametrize(("cfg", "n_folded", "n_refused"), PLACEMENTS, ids=lambda v: str(v))
def test_placements_fold_exactly_or_refuse_the_residual_stream(
    cfg: dict[str, Any], n_folded: int, n_refused: int
) -> None:
    model = _trained_lm(**({"norm": "batch_norm"} | cfg))
    ids = _windows(HELD_OUT, 4)
    ref = _logits(model, ids)
    if n_refused:
        with pytest.raises(ValueError, match=r"(?s)the model was not changed.*(residual stream|residual add)"):
            fold_norms(model, inplace=True)
        assert _logits(model, ids).equal(ref)  # nothing mutated on refusal
    report = fold_norms(model, strict=False)
    assert (len(report.folded), len(report.refused)) == (n_folded, n_refused)
    assert _rel(_logits(report.model, ids), ref) <= 1e-5
    for r in report.refused:
        assert isinstance(report.model.get_submodule(r.norm), NormBase)  # refused norms stay as they were


def test_qk_norm_per_head_folds_the_tiled_affine_into_q_and_k() -> None:
    model = _trained_lm(norm="batch_norm", qk_norm="rms", norm_overrides={"qk": "batch_norm"})
    report = fold_norms(model)
    rec = {r.norm: r for r in report.folded}["blocks.0.attn.q_norm"]
    assert rec.direction == "into_producer" and rec.targets == ("blocks.0.attn.q_proj",)
    a = norm_affine(model.blocks[0].attn.q_norm)
    a_in = norm_affine(model.blocks[0].attn_in_norm)  # q_proj also reads attn_in_norm: its columns are scaled too
    w0, w1 = model.blocks[0].attn.q_proj.weight, report.model.blocks[0].attn.q_proj.weight
    assert a.scale.numel() == 8  # d_head: one affine shared by the 4 heads, tiled over q_proj's 32 rows
    want = a.scale.repeat(4)[:, None] * w0.double() * a_in.scale[None, :]
    torch.testing.assert_close(w1.double(), want, rtol=1e-6, atol=0)


def test_vit_on_real_digits_folds_exactly() -> None:
    x, y = _digits()
    cfg = TransformerConfig(
        d_model=32, n_layers=2, n_heads=4, norm="batch_norm", image_size=8, patch_size=4, in_channels=1, num_classes=10
    )
    model = ViTEncoder(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(8):
        sl = slice(64 * step, 64 * step + 64)
        loss = model(x[sl], labels=y[sl]).loss
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    held = x[-200:]
    with torch.no_grad():
        ref = model(held).logits
        report = fold_norms(model)
        out = report.model(held).logits
    assert [r.targets for r in report.folded if r.norm == "final_norm"] == [("head",)]
    assert len(report.folded) == 5 and _rel(out, ref) <= 1e-5


def _digits() -> tuple[Tensor, Tensor]:
    digits = require("sklearn.datasets", "data").load_digits()
    return torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0, torch.tensor(digits.target)


@pytest.mark.parametrize(
    ("model", "n_norms"),
    # ResNet-8: the stem, 2 per block, and the norm of the 1x1-conv shortcut of stages 2 and 3
    [(DigitsCNN(CNNConfig(channels=[8, 16, 16])), 3), (ResNet(ResNetConfig(depth=8, width=8, in_channels=1)), 9)],
    ids=["DigitsCNN", "ResNet"],
)
def test_cnns_fold_directly_by_tracing(model: nn.Module, n_norms: int) -> None:
    """The CNNs' ``forward(x, labels=None, output_hidden_states=False)`` traces with its optional arguments at their
    defaults, so fold_norms finds every conv -> BatchNorm pair with no consumers map; outputs on real digits agree."""
    x, y = _digits()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(4):  # real running statistics and weights
        sl = slice(64 * step, 64 * step + 64)
        loss = model(x[sl], labels=y[sl]).loss
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    held = x[-200:]
    with torch.no_grad():
        ref = model(held).logits
        report = fold_norms(model)
        out = report.model(held, labels=y[-200:], output_hidden_states=True)
    assert len(report.folded) == n_norms and not report.refused
    assert all(r.direction == "into_producer" for r in report.folded)
    assert not any(isinstance(m, get_norm("batch_norm").cls) for m in report.model.modules())
    assert out.loss is not None and out.hidden_states is not None  # the folded model keeps its full forward
    assert _rel(out.logits, ref) <= 1e-5


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids).logits


@pytest.mark.parametrize("norm", ["power_norm", "unified_norm", "rep_batch_norm", "batch_norm"])
def test_folded_model_runs_under_torch_export(norm: str) -> None:
    model = _trained_lm(norm=norm)  # power_norm: GroupScaling stays in the graph, the export must carry it
    ids = _windows(HELD_OUT, 2)
    ref = _logits(model, ids)
    folded = _Logits(fold_norms(model).model)
    assert not any(isinstance(m, get_norm(norm).cls) for m in folded.modules())
    program = torch.export.export(folded, (ids,))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in op or "var_mean" in op for op in ops), sorted(ops)  # no statistics left
    with torch.no_grad():
        out = program.module()(ids)
    torch.testing.assert_close(out, folded(ids), rtol=1e-6, atol=1e-6)
    assert _rel(out, ref) <= 1e-5


def test_refuses_tied_lm_head_sigma_reparam_and_non_foldable_norms() -> None:
    cfg = {"d_model": 32, "n_layers": 1, "n_heads": 4, "vocab_size": 256, "max_seq_len": SEQ}
    tied = DecoderLM(TransformerConfig(norm="batch_norm", **cfg)).eval()
    tied.lm_head.weight = tied.embed.weight
    with pytest.raises(ValueError, match=r"final_norm \(BatchNorm\): the weight of lm_head is shared/tied with embed"):
        fold_norms(tied)
    sigma = DecoderLM(TransformerConfig(norm="batch_norm", sigma_reparam=True, **cfg)).eval()
    with pytest.raises(TypeError, match=r"attn.q_proj is SigmaReparamLinear, not nn.Linear"):
        fold_norms(sigma)
    mixed = DecoderLM(TransformerConfig(norm="layer_norm", norm_overrides={"final": "batch_norm"}, **cfg)).eval()
    with pytest.raises(TypeError, match=r"refused to fold 2 norm\(s\)"):
        fold_norms(mixed)
    assert [r.norm for r in fold_norms(mixed, strict=False).folded] == ["final_norm"]


def test_prep_batch_norm_mid_ramp_folds_exactly_in_eval_with_a_note() -> None:
    model = _trained_lm(norm="prep_batch_norm", norm_kwargs={"total_steps": 20})  # 8 of 20 ramp steps done
    assert model.final_norm.current_lambda() == 12 / 20
    ids = _windows(HELD_OUT, 4)
    ref = _logits(model, ids)
    report = fold_norms(model)
    assert len(report.folded) == 5 and _rel(_logits(report.model, ids), ref) <= 1e-5
    assert all("ramp unfinished (warm=0, iter=12 of total_step=20, next training lambda=0.6)" in r.note
               for r in report.folded)
    assert "note: LayerNorm -> RepBN ramp unfinished" in str(report)
    model.blocks[0].attn_in_norm.train()
    with pytest.raises(RuntimeError, match=r"norms in train mode: blocks.0.attn_in_norm"):
        fold_norms(model)
    finished = _trained_lm(norm="prep_batch_norm", norm_kwargs={"total_steps": 4})
    assert all(r.note == "" for r in fold_norms(finished).folded)
