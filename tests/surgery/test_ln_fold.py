"""fold_ln and its companions on real pretrained-style models, proven by log-probs before/after on stdlib text."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.models import DecoderLM, TransformerConfig
from normlab.nn import LayerNorm
from normlab.surgery.ln_fold import center_unembed, center_writing_weights, fold_ln, fold_value_biases
from tests._extras import require
from tests.surgery._stream_models import (
    gpt2,
    logits,
    max_logit_delta,
    max_logprob_delta,
    text_ids,
    trained_decoder,
)

TOL = 1e-5  # |Δ log-prob| in float32


def _gpt2_ids() -> torch.Tensor:
    return text_ids(4, 96, gpt2=True)


def test_gpt2_fold_ln_default_keeps_log_probs_and_the_final_beta() -> None:
    model, ids = gpt2(), _gpt2_ids()
    report = fold_ln(model)
    folded = report.model
    assert max_logprob_delta(model, folded, ids) <= TOL
    for block in folded.transformer.h:
        for ln in (block.ln_1, block.ln_2):
            assert type(ln) is nn.LayerNorm and not ln.elementwise_affine and ln.eps == model.config.layer_norm_epsilon
    # lm_head has no bias, so the final norm's β stays where it is (never dropped) and the report says so.
    assert folded.lm_head.bias is None and folded.transformer.ln_f.elementwise_affine
    assert [c.module for c in report.kept] == ["transformer.ln_f"]
    assert folded.lm_head.weight is not folded.transformer.wte.weight and not folded.config.tie_word_embeddings
    assert model.lm_head.weight is model.transformer.wte.weight  # the input model is untouched
    v_bias = folded.transformer.h[0].attn.c_attn.bias[2 * 48 :]
    assert torch.equal(v_bias, torch.zeros_like(v_bias))
    assert not report.inplace and report.family == "gpt2"


def test_gpt2_fold_ln_head_bias_folds_the_final_beta() -> None:
    model, ids = gpt2(), _gpt2_ids()
    folded = fold_ln(model, final_bias="head_bias").model
    assert max_logprob_delta(model, folded, ids) <= TOL
    assert folded.lm_head.bias is not None and not folded.transformer.ln_f.elementwise_affine


def test_gpt2_each_op_alone() -> None:
    model, ids = gpt2(), _gpt2_ids()
    centred = center_writing_weights(model).model
    assert max_logit_delta(model, centred, ids) <= TOL
    with torch.no_grad():
        hidden = centred(ids, output_hidden_states=True).hidden_states
    assert max(h.mean(-1).abs().max().item() for h in hidden[:-1]) < 1e-5  # the stream is zero-mean
    unembed = center_unembed(model).model
    assert max_logit_delta(model, unembed, ids) > 1e-3  # logits moved ...
    assert max_logprob_delta(model, unembed, ids) <= TOL  # ... by a per-position constant
    values = fold_value_biases(model).model
    assert max_logit_delta(model, values, ids) <= TOL
    assert values.transformer.h[1].attn.c_attn.bias[2 * 48 :].abs().max() == 0


def test_gpt2_ops_refuse_cross_attention_and_inplace_rewrites_the_model() -> None:
    with pytest.raises(ValueError, match="add_cross_attention=True"):
        fold_ln(gpt2(add_cross_attention=True))
    model, ids = gpt2(), _gpt2_ids()
    before = logits(model, ids)
    report = fold_ln(model, inplace=True)
    assert report.model is model and report.inplace
    assert (logits(model, ids).log_softmax(-1) - before.log_softmax(-1)).abs().max() <= TOL


def test_gpt2_fold_ln_saves_and_reloads_into_gpt2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    transformers = require("transformers", "hf")
    model, ids = gpt2(), _gpt2_ids()
    folded = fold_ln(model, keep_ln_params=True).model
    folded.save_pretrained(tmp_path)
    reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert max_logprob_delta(model, reloaded.eval(), ids) <= TOL


def test_gpt2_classifier_and_base_model() -> None:
    ids = _gpt2_ids()
    clf = gpt2(cls="GPT2ForSequenceClassification", num_labels=3, pad_token_id=0)
    folded = fold_ln(clf, final_bias="head_bias").model
    assert max_logprob_delta(clf, folded, ids[:, :1].expand(4, 8).contiguous()) <= TOL
    base = gpt2(cls="GPT2Model")
    report = fold_ln(base)
    assert [c.module for c in report.kept] == ["ln_f"]
    with torch.no_grad():
        delta = (base(ids).last_hidden_state - report.model(ids).last_hidden_state).abs().max().item()
    assert delta <= TOL


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_trained_decoder_fold_ln(mlp: str) -> None:
    model, ids = trained_decoder(mlp), text_ids(4, 64, offset=150_000)
    for final_bias in ("auto", "head_bias"):
        report = fold_ln(model, final_bias=final_bias)
        assert max_logprob_delta(model, report.model, ids) <= TOL
        norms = [b.attn_in_norm for b in report.model.blocks] + [b.mlp_in_norm for b in report.model.blocks]
        assert all(isinstance(n, LayerNorm) and n.weight is None and n.bias is None for n in norms)
    assert report.model.lm_head.bias is not None and report.model.final_norm.weight is None


def test_refuses_post_ln_unknown_models_and_other_norms() -> None:
    transformers = require("transformers", "hf")
    bert = transformers.BertModel(
        transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(ValueError, match=r"fold_ln: BertModel \(model_type='bert'\) is a Post-LN model"):
        fold_ln(bert)
    post = DecoderLM(TransformerConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=32, placement="post"))
    with pytest.raises(ValueError, match=r"Post-LN model \(placement='post'"):
        center_writing_weights(post)
    with pytest.raises(TypeError, match="fold_ln: unsupported model type Sequential"):
        fold_ln(nn.Sequential(nn.Linear(2, 2)))
    rms = DecoderLM(TransformerConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=32, norm="rms_norm"))
    with pytest.raises(
        TypeError, match=r"expected a LayerNorm over the last axis of width 16 at blocks\.0\.attn_in_norm"
    ):
        fold_ln(rms)
    no_final = DecoderLM(TransformerConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=32, final_norm=False))
    with pytest.raises(ValueError, match="final_norm=False"):
        fold_ln(no_final)
    with pytest.raises(ValueError, match=r"expected final_bias in \('auto', 'head_bias', 'keep'\), got 'drop'"):
        fold_ln(no_final, final_bias="drop")  # type: ignore[arg-type]
