"""Tests of normlab/diagnostics/attention.py: recomputed probabilities equal what SDPA used, entropy values on
uniform attention, per-head rows, padding exclusion and the eager-attention fallback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from normlab.diagnostics import AttentionEntropy, attention_probs, collect, entropy_per_query
from normlab.models import DecoderLM, TransformerConfig
from tests._extras import require


@pytest.mark.parametrize("case", ["none", "causal", "bool", "float", "gqa"])
def test_probs_reproduce_sdpa(case: str) -> None:
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    kwargs: dict = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "bool":
        kwargs["attn_mask"] = (torch.rand(2, 1, 5, 5) > 0.3) | torch.eye(5, dtype=torch.bool)
    elif case == "float":
        m = torch.zeros(2, 1, 5, 5)
        m[..., 3:] = torch.finfo(torch.float32).min
        kwargs["attn_mask"] = m
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3, **kwargs)
    probs, allowed = attention_probs(q, k, kwargs.get("attn_mask"), kwargs.get("is_causal", False), 0.3,
                                     kwargs.get("enable_gqa", False))
    vv = v.double().repeat_interleave(2, dim=1) if case == "gqa" else v.double()
    torch.testing.assert_close((probs @ vv).float(), expected, atol=1e-5, rtol=1e-5)
    assert not bool(probs[~allowed].any())
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1], dtype=torch.float64))


def test_entropy_values() -> None:
    uniform = torch.full((1, 1, 1, 4), 0.25)
    assert float(entropy_per_query(uniform)) == pytest.approx(math.log(4))
    one_hot = torch.tensor([[[[0.0, 1.0, 0.0]]]])
    assert float(entropy_per_query(one_hot)) == 0.0


def _uniform_decoder(n_layers: int = 2, n_heads: int = 2) -> DecoderLM:
    model = DecoderLM(TransformerConfig(d_model=16, n_layers=n_layers, n_heads=n_heads, max_seq_len=8))
    with torch.no_grad():
        for block in model.blocks:  # q = 0 -> every allowed key gets the same logit
            block.attn.q_proj.weight.zero_()
            block.attn.q_proj.bias.zero_()
    return model


def test_causal_uniform_attention_entropy_with_padding() -> None:
    model = _uniform_decoder()
    ids = torch.randint(0, 256, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    rows = collect(model, {"input_ids": ids, "attention_mask": mask}, ["attention_entropy"])
    # Valid queries: positions 0..5 of row 0 and 0..2 of row 1; query i sees i + 1 keys.
    n_keys = [*range(1, 7), *range(1, 4)]
    raw = sum(math.log(n) for n in n_keys) / len(n_keys)
    layer_rows = [r for r in rows if "head" not in r]
    head_rows = [r for r in rows if "head" in r]
    assert len(layer_rows) == 2 * 2 and len(head_rows) == 2 * 2 * 2
    for r in rows:
        if r["variant"] == "raw":
            assert r["value"] == pytest.approx(raw, rel=1e-9)
        else:  # query 0 (one key) is left out of the normalised entropy
            assert r["value"] == pytest.approx(1.0, rel=1e-9)
            assert r["count"] == 7 * (2 if "head" not in r else 1)


def test_layers_attributed_by_block_and_records_calls() -> None:
    model = DecoderLM(TransformerConfig(d_model=16, n_layers=3, n_heads=4, max_seq_len=8))
    rows = collect(model, torch.randint(0, 256, (2, 8)), ["attention_entropy"])
    assert sorted({r["layer"] for r in rows}) == [1, 2, 3]
    assert sorted({r["head"] for r in rows if "head" in r}) == [0, 1, 2, 3]
    for r in rows:
        assert 0.0 < r["value"] <= (math.log(8) if r["variant"] == "raw" else 1.0) + 1e-9


def test_add_probs_fallback_and_errors() -> None:
    ent = AttentionEntropy()
    probs = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    ent.set_query_mask(torch.tensor([[True, True]]))
    ent.add_probs(probs, layer=4)
    rows = {(r["variant"], r.get("head")): r["value"] for r in ent.rows()}
    assert rows[("raw", None)] == pytest.approx(math.log(2) / 2)
    assert rows[("normalized", 0)] == pytest.approx(1.0)  # only the query with two allowed keys
    with pytest.raises(ValueError, match=r"expected probabilities of size \[B, H, L, S\]"):
        ent.add_probs(torch.ones(2, 2))


def test_warns_without_attention() -> None:
    from tests.diagnostics._toy import Scale, ToyModel

    with pytest.warns(UserWarning, match="no attention call was seen"):
        rows = collect(ToyModel([Scale(1.0)]), torch.tensor([[1, 2]]), ["attention_entropy"])
    assert rows == []


def test_hugging_face_llama_with_gqa_and_padding() -> None:
    transformers = require("transformers", "hf")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()  # q = 0 (RoPE keeps it 0): uniform over the allowed keys
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    rows = collect(model, {"input_ids": ids, "attention_mask": mask}, ["attention_entropy"])
    raw = (math.lgamma(8) + math.lgamma(5)) / 11  # mean of log(i + 1) over the 7 + 4 valid queries
    assert len(rows) == 2 * 2 + 2 * 2 * 4
    for r in rows:
        assert r["value"] == pytest.approx(raw if r["variant"] == "raw" else 1.0, rel=1e-9)
