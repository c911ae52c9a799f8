"""Tests of normlab/models/block.py: each placement's defining equation on a tiny float64 block.

The norms are affine-free LayerNorms with a negligible eps, so "normalised" means per-token mean 0 and variance 1,
and the equations can be checked against ``torch.nn.functional.layer_norm`` computed independently of the block.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from normlab.models import Block, DecoderLM, TransformerConfig
from normlab.models.transformer import block_placements

D, L, N = 16, 4, 6
EPS = 1e-12


def _config(placement: str, **kwargs: Any) -> TransformerConfig:
    base: dict[str, Any] = {
        "d_model": D,
        "n_layers": L,
        "n_heads": 2,
        "placement": placement,
        "norm": "layer_norm",
        "norm_kwargs": {"affine": False, "eps": EPS},
        "max_seq_len": N,
    }
    base.update(kwargs)
    return TransformerConfig(**base)


def _block(placement: str, layer_idx: int = 1, **kwargs: Any) -> Block:
    cfg = _config(placement, **kwargs)
    return Block(cfg, layer_idx, placement, n_tokens=N).double()


def _ln(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=EPS)


def _run(block: Block, x: Tensor) -> dict[str, Tensor]:
    """Block output plus the sublayer inputs/outputs, captured with hooks."""
    seen: dict[str, Tensor] = {}
    handles = [
        block.attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn_in", a[0])),
        block.attn.register_forward_hook(lambda m, a, o: seen.__setitem__("attn_out", o)),
        block.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0])),
        block.mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp_out", o)),
    ]
    seen["y"] = block(x, is_causal=True)
    for h in handles:
        h.remove()
    return seen


def _assert_normalised(t: Tensor) -> None:
    torch.testing.assert_close(t.mean(-1), torch.zeros_like(t[..., 0]), rtol=0, atol=1e-9)
    torch.testing.assert_close(t.var(-1, unbiased=False), torch.ones_like(t[..., 0]), rtol=0, atol=1e-8)


def _assert_not_normalised(t: Tensor) -> None:
    assert (t.var(-1, unbiased=False) - 1).abs().max() > 0.05


def _x() -> Tensor:
    return 3.0 * torch.randn(2, N, D, dtype=torch.float64) + 1.0


def test_pre_ln_equation() -> None:
    block, x = _block("pre"), _x()
    s = _run(block, x)
    torch.testing.assert_close(s["attn_in"], _ln(x))
    h = x + s["attn_out"]
    torch.testing.assert_close(s["mlp_in"], _ln(h))
    torch.testing.assert_close(s["y"], h + s["mlp_out"])
    _assert_not_normalised(s["y"])  # the identity path is never normalised
    assert block.out_norm_position is None and block.attn_out_norm is None and block.mlp_out_norm is None


@pytest.mark.parametrize("placement", ["post", "deepnorm"])
def test_post_ln_and_deepnorm_equations(placement: str) -> None:
    block, x = _block(placement), _x()
    alpha = (2 * L) ** 0.25 if placement == "deepnorm" else 1.0
    assert block.resid_alpha == pytest.approx(alpha)
    s = _run(block, x)
    torch.testing.assert_close(s["attn_in"], x)  # no input norm
    h = _ln(alpha * x + s["attn_out"])  # x_{l+1} = LN(α x_l + G(x_l))
    torch.testing.assert_close(s["mlp_in"], h)
    torch.testing.assert_close(s["y"], _ln(alpha * h + s["mlp_out"]))
    _assert_normalised(s["mlp_in"])
    _assert_normalised(s["y"])
    assert block.out_norm_position == "after_add" and block.attn_in_norm is None


def test_deepnorm_alpha_changes_the_output() -> None:
    block, x = _block("deepnorm"), _x()
    y = block(x, is_causal=True)
    block.resid_alpha = 1.0
    assert not torch.allclose(block(x, is_causal=True), y)


@pytest.mark.parametrize("placement", ["peri", "sandwich"])
def test_peri_and_sandwich_normalise_the_branch_output_before_the_add(placement: str) -> None:
    block, x = _block(placement), _x()
    s = _run(block, x)
    torch.testing.assert_close(s["attn_in"], _ln(x))
    h = x + _ln(s["attn_out"])
    torch.testing.assert_close(s["mlp_in"], _ln(h))
    torch.testing.assert_close(s["y"], h + _ln(s["mlp_out"]))
    _assert_normalised(h - x)  # each branch adds a unit-variance vector
    _assert_normalised(s["y"] - h)
    _assert_not_normalised(s["y"])
    assert block.out_norm_position == "branch"


@pytest.mark.parametrize("layer_idx", [1, 2, 3, 4])
def test_lns_scales_the_in_block_norm_outputs_by_inverse_sqrt_layer(layer_idx: int) -> None:
    block, x = _block("lns", layer_idx), _x()
    assert block.branch_scale == pytest.approx(1 / math.sqrt(layer_idx))
    s = _run(block, x)
    torch.testing.assert_close(s["attn_in"], _ln(x) / math.sqrt(layer_idx))
    h = x + s["attn_out"]
    torch.testing.assert_close(s["mlp_in"], _ln(h) / math.sqrt(layer_idx))
    torch.testing.assert_close(s["y"], h + s["mlp_out"])
    var = s["attn_in"].var(-1, unbiased=False)
    torch.testing.assert_close(var, torch.full_like(var, 1 / layer_idx))


def test_lns_in_a_model_is_one_based_and_leaves_the_final_norm_unscaled() -> None:
    model = DecoderLM(_config("lns")).double()
    assert [b.layer_idx for b in model.blocks] == [1, 2, 3, 4]
    assert [b.branch_scale for b in model.blocks] == pytest.approx([1, 2**-0.5, 3**-0.5, 0.5])
    seen: dict[str, Tensor] = {}
    assert model.final_norm is not None
    model.final_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("final", o))
    model(torch.randint(0, 256, (2, N)))
    _assert_normalised(seen["final"])


def test_mix_ln_switches_at_floor_alpha_l() -> None:
    assert block_placements(_config("mix", n_layers=8)) == ["post"] * 2 + ["pre"] * 6
    assert block_placements(_config("mix", n_layers=6)) == ["post"] + ["pre"] * 5  # floor(1.5) = 1
    assert block_placements(_config("mix", n_layers=8, mix_alpha=0.5)) == ["post"] * 4 + ["pre"] * 4
    assert block_placements(_config("mix", n_layers=8, mix_alpha=0.0)) == ["pre"] * 8
    assert block_placements(_config("mix", n_layers=8, mix_alpha=1.0)) == ["post"] * 8


def test_mix_ln_blocks_obey_their_own_equations() -> None:
    model = DecoderLM(_config("mix", n_layers=8)).double()
    assert [b.placement for b in model.blocks] == ["post", "post"] + ["pre"] * 6
    x = _x()
    post, pre = model.blocks[1], model.blocks[2]
    s = _run(post, x)
    assert post.attn_in_norm is None and post.out_norm_position == "after_add"
    _assert_normalised(s["y"])
    torch.testing.assert_close(s["y"], _ln(s["mlp_in"] + s["mlp_out"]))
    s = _run(pre, x)
    assert pre.attn_out_norm is None and pre.attn_in_norm is not None
    torch.testing.assert_close(s["attn_in"], _ln(x))
    _assert_not_normalised(s["y"])


def test_normformer_extras() -> None:
    block, x = _block("normformer"), _x()
    assert block.mlp_out_norm is None and block.attn_out_norm is not None
    assert block.mlp.inner_norm is not None and block.mlp.inner_norm.num_features == 4 * D
    assert block.attn.head_scale is not None
    torch.testing.assert_close(block.attn.head_scale.detach(), torch.ones(2, dtype=torch.float64))
    seen: dict[str, Tensor] = {}
    block.mlp.fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("fc2_in", a[0]))
    s = _run(block, x)
    torch.testing.assert_close(s["attn_in"], _ln(x))
    h = x + _ln(s["attn_out"])  # post-attention LN before the add
    torch.testing.assert_close(s["mlp_in"], _ln(h))
    torch.testing.assert_close(seen["fc2_in"], _ln(F.gelu(block.mlp.fc1(s["mlp_in"]))))  # LN after the activation
    torch.testing.assert_close(s["y"], h + s["mlp_out"])  # no norm on the FFN output
    _assert_not_normalised(s["y"] - h)


def test_normformer_head_scale_multiplies_each_head_before_out_proj() -> None:
    block, x = _block("normformer"), _x()
    seen: list[Tensor] = []
    block.attn.out_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    block(x, is_causal=True)
    scale = torch.tensor([0.5, 3.0], dtype=torch.float64)
    with torch.no_grad():
        block.attn.head_scale.copy_(scale)
    block(x, is_causal=True)
    d_head = D // 2
    torch.testing.assert_close(seen[1], seen[0] * scale.repeat_interleave(d_head))


def test_block_argument_errors() -> None:
    cfg = _config("pre")
    with pytest.raises(ValueError, match="expected placement in .* got 'mix'"):
        Block(cfg, 1, "mix", n_tokens=N)
    with pytest.raises(ValueError, match="expected a 1-based layer_idx >= 1, got 0"):
        Block(cfg, 0, "pre", n_tokens=N)
