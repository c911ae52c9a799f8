"""Tests of normlab/models/vit.py: the ViT-style encoder on tiny images (scikit-learn's 8x8 digits when present)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from normlab.models import PLACEMENTS, TransformerConfig, ViTEncoder
from normlab.nn import DyT
from tests._extras import require


def _cfg(**kwargs: Any) -> TransformerConfig:
    base: dict[str, Any] = {
        "d_model": 16,
        "n_layers": 2,
        "n_heads": 2,
        "image_size": 8,
        "patch_size": 2,
        "in_channels": 1,
        "num_classes": 10,
    }
    base.update(kwargs)
    return TransformerConfig(**base)


def _digits(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    datasets = require("sklearn.datasets", "data")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return (x - 0.3) / 0.4, torch.tensor(digits.target[:n])


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm", "dyt", "batch_norm"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_vit_trains_on_digits(placement: str, norm: str) -> None:
    x, y = _digits()
    torch.manual_seed(0)
    # With 2 blocks the default mix_alpha=0.25 makes no block Post-LN (floor(0.5) = 0); 0.5 gives one of each.
    extra = {"mix_alpha": 0.5} if placement == "mix" else {}
    model = ViTEncoder(_cfg(placement=placement, norm=norm, **extra))
    if placement == "mix":
        assert [b.placement for b in model.blocks] == ["post", "pre"]
    # Seeded, 8 full-batch steps at lr 1e-3: on seeds 0-9 every placement x norm case ended lower, by 0.01-0.13
    # (dyt: 0.002, its tanh keeps early updates small). 4 steps at lr 3e-3 rose on some seeds (sandwich and
    # normformer with rms_norm: Adam's first steps overshoot).
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = model(x, labels=y)
        assert out.logits.shape == (64, 10) and out.loss is not None and torch.isfinite(out.loss)
        losses.append(float(out.loss.detach()))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


def test_vit_structure_and_hidden_states() -> None:
    model = ViTEncoder(_cfg(n_layers=3)).eval()
    x = torch.randn(2, 1, 8, 8)
    out = model(x, output_hidden_states=True)
    assert model.n_patches == 16 and model.pos_embed.shape == (1, 17, 16)
    assert out.hidden_states is not None and len(out.hidden_states) == 4
    assert all(h.shape == (2, 17, 16) for h in out.hidden_states)
    torch.testing.assert_close(out.logits, model.head(model.final_norm(out.hidden_states[-1])[:, 0]))
    assert out.loss is None


def test_vit_is_not_causal() -> None:
    model = ViTEncoder(_cfg()).eval()
    x = torch.randn(1, 1, 8, 8)
    changed = x.clone()
    changed[..., -2:, -2:] += 1.0  # only the last patch
    seen: list[torch.Tensor] = []
    model.blocks[0].register_forward_hook(lambda m, a, o: seen.append(o))
    model(x)
    model(changed)
    assert not torch.allclose(seen[0][:, 0], seen[1][:, 0])  # the class token (first) sees the last patch


def test_vit_encoder_coefficients_and_defaults() -> None:
    deep = ViTEncoder(_cfg(placement="deepnorm", n_layers=3))
    assert all(b.resid_alpha == pytest.approx(6**0.25) for b in deep.blocks)  # encoder-only (2N)^{1/4}
    dyt = ViTEncoder(_cfg(norm="dyt"))
    assert {m.alpha_init for m in dyt.modules() if isinstance(m, DyT)} == {0.5}  # non-LLM α0
    l2 = ViTEncoder(_cfg(qk_norm="l2"))
    assert float(l2.blocks[0].attn.qk_scale.detach()) == pytest.approx(math.log2(17 * 17 - 17))


def test_vit_input_errors() -> None:
    model = ViTEncoder(_cfg())
    with pytest.raises(ValueError, match=r"expected pixel_values of shape \[B, 1, 8, 8\], got size \[2, 3, 8, 8\]"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match="expected pixel_values to be a floating-point tensor"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected labels of size \[2\], got \[2, 1\]"):
        model(torch.randn(2, 1, 8, 8), labels=torch.zeros(2, 1, dtype=torch.long))


def test_vit_embed_norm_and_refused_embed_scale() -> None:
    model = ViTEncoder(_cfg(embed_norm="layer_norm")).eval()
    x = torch.randn(2, 1, 8, 8)
    h0 = model(x, output_hidden_states=True).hidden_states[0]
    patches = model.embed(x).flatten(2).transpose(1, 2)
    raw = torch.cat([model.cls_token.expand(2, -1, -1), patches], dim=1) + model.pos_embed
    torch.testing.assert_close(h0, torch.nn.functional.layer_norm(raw, (16,), eps=model.embed_norm.eps))
    assert ViTEncoder(_cfg()).embed_norm is None
    with pytest.raises(ValueError, match="ViTEncoder: .*expected embed_scale=None, got 'sqrt_d'"):
        ViTEncoder(_cfg(embed_scale="sqrt_d"))
