"""Exact Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm conversion on GPT-2 and a trained DecoderLM: logits before/after on
stdlib text, training-mode equivalence, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normlab.models import DecoderLM, TransformerConfig
from normlab.nn import CRMSNorm, RMSNorm
from normlab.surgery.convert import PadLastAxis, convert_to_crms_norm, convert_to_rms_norm
from tests._extras import require
from tests.surgery._stream_models import gpt2, max_logit_delta, text_ids, trained_decoder

TOL = 1e-4  # max |Δ logit| in float32


def _gpt2_ids() -> torch.Tensor:
    return text_ids(4, 96, gpt2=True)


def test_gpt2_rms_norm_unties_a_head_behind_an_affine_final_norm() -> None:
    model, ids = gpt2(), _gpt2_ids()
    report = convert_to_rms_norm(model)
    conv = report.model
    assert max_logit_delta(model, conv, ids) <= TOL
    norms = [conv.transformer.ln_f] + [ln for b in conv.transformer.h for ln in (b.ln_1, b.ln_2)]
    assert all(
        type(n) is RMSNorm and n.eps == model.config.layer_norm_epsilon and n.eps_placement == "inside" for n in norms
    )
    torch.testing.assert_close(conv.transformer.ln_f.bias, model.transformer.ln_f.bias)  # γ, β carried over
    assert conv.lm_head.weight is not conv.transformer.wte.weight
    torch.testing.assert_close(conv.lm_head.weight, model.lm_head.weight)  # the head keeps the original unembedding
    assert "weight" in dict(conv.transformer.h[0].ln_1.named_parameters())  # state-dict keys kept


def test_gpt2_rms_norm_keeps_the_tie_behind_an_identity_final_norm() -> None:
    model, ids = gpt2(perturb=False), _gpt2_ids()
    with torch.no_grad():  # non-trivial writers and block norms; the final norm stays γ = 1, β = 0
        for name, p in model.named_parameters():
            if "ln_f" not in name and (name.endswith("bias") or ".ln_" in name):
                p.add_(0.2 * torch.randn_like(p))
    conv = convert_to_rms_norm(model).model
    assert conv.lm_head.weight is conv.transformer.wte.weight
    assert conv.transformer.wte.weight.mean(-1).abs().max() < 1e-6  # centred, and still exact for the head
    assert max_logit_delta(model, conv, ids) <= TOL


def test_gpt2_crms_norm_shrinks_the_stream() -> None:
    model, ids = gpt2(), _gpt2_ids()
    report = convert_to_crms_norm(model)
    conv = report.model
    assert max_logit_delta(model, conv, ids) <= TOL
    assert conv.transformer.wte.weight.shape == (320, 47) and conv.transformer.wpe.weight.shape == (128, 47)
    assert conv.transformer.h[0].attn.c_attn.weight.shape == (47, 144) and conv.lm_head.in_features == 47
    assert all(type(b.ln_1) is CRMSNorm and b.ln_1.num_features == 47 for b in conv.transformer.h)
    assert any("47 wide" in n for n in report.notes)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_trained_decoder_conversions(mlp: str) -> None:
    model, ids = trained_decoder(mlp), text_ids(4, 64, offset=150_000)
    rms = convert_to_rms_norm(model).model
    assert max_logit_delta(model, rms, ids) <= TOL
    assert type(rms.final_norm) is RMSNorm and type(rms.blocks[1].mlp_in_norm) is RMSNorm
    crms = convert_to_crms_norm(model).model
    assert max_logit_delta(model, crms, ids) <= TOL
    assert crms.embed.weight.shape == (256, 47) and crms.pos_embed.shape == (1, 64, 47)
    # normlab's attention reshapes its context to its input width: its CRMSNorm output is padded back to d.
    assert isinstance(crms.blocks[0].attn_in_norm, PadLastAxis) and type(crms.blocks[0].mlp_in_norm) is CRMSNorm


def _train(model: nn.Module, *, gpt: bool, steps: int = 6) -> torch.Tensor:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    losses = []
    for step in range(steps):
        ids = text_ids(4, 64, offset=100_000 + step * 256, gpt2=gpt)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("family", ["decoder", "gpt2"])
def test_pre_rms_norm_trains_like_the_original(family: str) -> None:
    gpt = family == "gpt2"
    model = gpt2() if gpt else trained_decoder()
    reference = _train(copy.deepcopy(model), gpt=gpt)
    report = convert_to_rms_norm(model, zero_mean_training=True)
    assert report.by_action("parametrized")
    same = _train(report.model, gpt=gpt)
    assert ((same - reference).abs() / reference).max() <= 1e-5
    # Control: without the zero-mean parametrization the first step already leaves the stream's mean non-zero.
    drift = _train(convert_to_rms_norm(model).model, gpt=gpt)
    assert ((drift - reference).abs() / reference).max() > 2e-5


def test_refusals() -> None:
    transformers = require("transformers", "hf")
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(ValueError, match=r"convert_to_rms_norm: BertForMaskedLM \(model_type='bert'\) is a Post-LN"):
        convert_to_rms_norm(bert)
    deepnorm = DecoderLM(TransformerConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=32, placement="deepnorm"))
    with pytest.raises(ValueError, match="convert_to_crms_norm: .*Post-LN model"):
        convert_to_crms_norm(deepnorm)
    peri = DecoderLM(TransformerConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=32, placement="peri"))
    with pytest.raises(ValueError, match="placement='peri' is not Pre-LN"):
        convert_to_rms_norm(peri)
    with pytest.raises(TypeError, match="unsupported model type Linear"):
        convert_to_crms_norm(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"expected float32 or float64 parameters, got torch.float16"):
        convert_to_rms_norm(gpt2().half())
    with pytest.raises(ValueError, match=r"convert_to_crms_norm: expected float32 .* got torch.bfloat16"):
        convert_to_crms_norm(trained_decoder().bfloat16())
    with pytest.raises(ValueError, match=r"zero_mean_training needs no dropout .*transformer\.drop \(p=0\.1\)"):
        convert_to_rms_norm(gpt2(dropout=0.1), zero_mean_training=True)
    with pytest.raises(ValueError, match="GPT2Model has no head"):
        convert_to_crms_norm(gpt2(cls="GPT2Model"))
