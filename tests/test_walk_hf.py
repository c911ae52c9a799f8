"""The Hugging Face entries of the adapter table (normlab.walk_hf): every listed class that exists in the installed
transformers is reproduced by its normlab form (float32 bit for bit, bfloat16 within one ulp), the walker finds them
in models built from small configs, and normlab never imports transformers itself."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

from normlab import walk_hf
from normlab.nn import LayerNorm, RMSNorm
from normlab.walk import iter_norms, norm_protocol, normlab_form, spec_of, to_normlab
from tests._extras import require

pytestmark = pytest.mark.usefixtures("composite_norms")  # bit-for-bit claims: see tests/conftest.py


os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The classes the issue names: always run; the rest of the table is the slow sweep.
ANCHORS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "GemmaRMSNorm", "T5LayerNorm",
           "ConvNextLayerNorm", "GptOssRMSNorm", "OlmoLayerNorm"}
EPS = 1e-2  # comparable to mean(x^2) of the inputs below, so a wrong eps shows


def _table() -> list[Any]:
    params = []
    for module_name, names in walk_hf._BY_MODULE.items():
        for name, kind in names:
            marks = () if name in ANCHORS else (pytest.mark.slow,)
            params.append(pytest.param(module_name, name, kind, marks=marks, id=f"{kind}-{name}"))
    return params


def _build(cls: type[nn.Module], kind: str, c: int) -> nn.Module:
    if kind == "plain_ln":
        m = cls(c)
    elif kind == "channels_first_ln":
        m = cls(c, eps=EPS, data_format="channels_first")
    else:
        m = cls(c, eps=EPS)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    return m


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bfloat16 units in the last place (same-sign values: the bit patterns' difference)."""
    ia = a.contiguous().view(torch.int16).to(torch.int32)
    ib = b.contiguous().view(torch.int16).to(torch.int32)
    assert bool(((a >= 0) == (b >= 0)).all() | ((a - b).abs() == 0).all())
    return int((ia - ib).abs().max())


@pytest.mark.parametrize(("module_name", "name", "kind"), _table())
def test_entry_reproduces_the_class_forward(module_name: str, name: str, kind: str) -> None:
    require("transformers", "hf")
    if importlib.util.find_spec(module_name.rpartition(".")[0]) is None:
        pytest.skip(f"{module_name} is not in this transformers version")
    cls = getattr(importlib.import_module(module_name), name)
    torch.manual_seed(0)
    c = 24
    m = _build(cls, kind, c)
    x = torch.randn(2, c, 3, 5) if kind == "channels_first_ln" else 0.1 * torch.randn(3, 7, c)
    assert spec_of(m) is not None and walk_hf.kind_of(cls) == kind
    form = normlab_form(m)
    if kind != "plain_ln":
        assert form.kwargs["eps"] == EPS
    n = to_normlab(m)
    assert type(n) is (LayerNorm if kind.endswith("_ln") else RMSNorm)
    with torch.no_grad():
        assert torch.equal(n(x), m(x))
        mb = m.to(torch.bfloat16)
        nb = to_normlab(mb)
        xb = x.to(torch.bfloat16)
        ulps = _ulps(nb(xb), mb(xb))
    # llama kind: the gain is applied after the cast to bfloat16 in HF, before it in normlab (one rounding apart)
    assert ulps <= (1 if kind == "llama" else 0)


def test_gemma_unit_offset_is_the_registry_switch() -> None:
    transformers = require("transformers", "hf")
    g = transformers.models.gemma.modeling_gemma.GemmaRMSNorm(8, eps=1e-6)  # weight 0: gain 1
    n = to_normlab(g)
    assert isinstance(n, RMSNorm) and n.unit_offset and n.eps == 1e-6
    x = torch.randn(4, 8)
    assert torch.equal(n(x), g(x))
    assert torch.equal(RMSNorm(8, unit_offset=True)(x), RMSNorm(8)(x))  # fresh: weight 0 <-> weight 1


def _small(kind: str) -> nn.Module:
    transformers = require("transformers", "hf")
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
        return transformers.LlamaModel(cfg)
    if kind == "gemma":
        cfg = transformers.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        return transformers.GemmaModel(cfg)
    if kind == "convnext":
        cfg = transformers.ConvNextConfig(
            num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32
        )
        return transformers.ConvNextModel(cfg)
    if kind == "gpt2":
        return transformers.GPT2Model(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4))
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64)
        return transformers.BertModel(cfg)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64)
    return transformers.ViTModel(cfg)


@pytest.mark.parametrize(
    ("kind", "count", "spec_name", "example"),
    [
        ("llama", 5, "transformers.LlamaRMSNorm", "layers.0.input_layernorm"),
        ("gemma", 5, "transformers.GemmaRMSNorm", "layers.1.post_attention_layernorm"),
        ("convnext", 5, "transformers.ConvNextLayerNorm", "embeddings.layernorm"),
        ("gpt2", 5, "torch.nn.LayerNorm", "h.0.ln_1"),
        ("bert", 5, "torch.nn.LayerNorm", "encoder.layer.1.output.LayerNorm"),
        ("vit", 5, "torch.nn.LayerNorm", "layers.0.layernorm_before"),
    ],
)
def test_iter_norms_finds_the_norms_of_hf_models(kind: str, count: int, spec_name: str, example: str) -> None:
    model = _small(kind)
    found = {name: (m, spec) for name, m, spec in iter_norms(model)}
    assert len(found) == count, sorted(found)
    assert found[example][1].name == spec_name
    for m, _ in found.values():
        n = to_normlab(m)
        assert n.channel_dim == norm_protocol(m).channel_dim


def test_convnext_channel_axis_follows_data_format() -> None:
    model = _small("convnext")
    dims = {name: norm_protocol(m).channel_dim for name, m, _ in iter_norms(model)}
    assert dims["embeddings.layernorm"] == 1  # channels_first: LayerNorm over axis 1
    assert dims["encoder.stages.0.layers.0.layernorm"] == -1  # channels_last: plain LayerNorm
    x = torch.randn(2, 8, 4, 4)
    ln = model.embeddings.layernorm
    assert torch.equal(to_normlab(ln)(x), ln(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.LayerNorm(6, eps=1e-3),
        lambda: nn.LayerNorm(6, bias=False),
        lambda: nn.LayerNorm((2, 3)),
        lambda: nn.RMSNorm(6, eps=1e-4),
        lambda: nn.RMSNorm(6),
        lambda: nn.BatchNorm1d(6, momentum=None).eval(),
        lambda: nn.GroupNorm(2, 6, eps=1e-3),
    ],
    ids=["ln", "ln-nobias", "ln-2d", "rms", "rms-eps-none", "bn", "gn"],
)
def test_torch_entries_have_an_exact_normlab_form(make: Any) -> None:
    torch.manual_seed(0)
    m = make()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
        for name in ("running_mean", "running_var"):
            if getattr(m, name, None) is not None:
                getattr(m, name).copy_(torch.rand(6) + 0.5)
    x = torch.randn(4, 6) if not isinstance(m, nn.LayerNorm) or m.normalized_shape == (6,) else torch.randn(4, 2, 3)
    n = to_normlab(m)
    assert n.training == m.training
    assert torch.equal(n(x), m(x))


def test_forms_refuse_what_they_cannot_express() -> None:
    with pytest.raises(TypeError, match="InstanceNorm1d .*has no normlab form"):
        to_normlab(nn.InstanceNorm1d(4))
    with pytest.raises(TypeError, match="Linear is not a norm"):
        to_normlab(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="several trailing dims"):
        to_normlab(nn.RMSNorm((2, 3)))


def test_normlab_norm_form_is_its_own_constructor_call() -> None:
    m = RMSNorm(8, eps=1e-3, bias=True)
    form = normlab_form(m)
    assert (form.name, form.num_features, form.kwargs["eps"], form.kwargs["bias"]) == ("rms_norm", 8, 1e-3, True)
    x = torch.randn(3, 8)
    with torch.no_grad():
        m.bias.fill_(0.5)
    assert torch.equal(to_normlab(m)(x), m(x))


def test_normlab_does_not_import_transformers() -> None:
    code = ("import sys, torch, normlab, normlab.walk, normlab.surgery; from normlab.walk import iter_norms; "
            "list(iter_norms(torch.nn.Sequential(torch.nn.LayerNorm(4)))); "
            "assert 'transformers' not in sys.modules, 'imported'")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
