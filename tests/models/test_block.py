"""Tests of normlab/models/block.py: each placement's defining equation on a tiny float64 block.

Every equation test runs for the four representative norms of issue #4 (layer_norm, rms_norm, dyt, batch_norm). The
reference for each norm position is the block's own norm module of that slot (``attn_in_norm``, ``attn_out_norm``,
``mlp_in_norm``, ``mlp_out_norm``, ``mlp.inner_norm``), applied to the sublayer inputs and outputs captured with hooks;
the norms' affine parameters are first set to distinct random values so that a block using the wrong slot's module,
or none, fails. The property checks then reset the norms to their default init and check what "normalised" means for
each norm: per-token mean 0 / variance 1 (layer_norm), per-token mean square 1 (rms_norm), per-channel batch mean 0 /
variance 1 (batch_norm in train mode) and values inside (-1, 1) (dyt: ``tanh`` with γ = 1, β = 0). The eps of the
statistic norms is negligible so these hold to 1e-8.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.models import Block, DecoderLM, TransformerConfig
from normlab.models.transformer import block_placements
from normlab.registry import get_norm

D, L, N = 16, 4, 6
EPS = 1e-12
NORMS = ("layer_norm", "rms_norm", "dyt", "batch_norm")
SLOTS = ("attn_in_norm", "attn_out_norm", "mlp_in_norm", "mlp_out_norm")


def _config(placement: str, norm: str = "layer_norm", **kwargs: Any) -> TransformerConfig:
    base: dict[str, Any] = {
        "d_model": D,
        "n_layers": L,
        "n_heads": 2,
        "placement": placement,
        "norm": norm,
        "norm_kwargs": {} if norm == "dyt" else {"eps": EPS},
        "max_seq_len": N,
    }
    base.update(kwargs)
    return TransformerConfig(**base)


def _norm_modules(block: nn.Module) -> list[nn.Module]:
    found = [getattr(block, s) for s in SLOTS if getattr(block, s) is not None]
    inner = getattr(block.mlp, "inner_norm", None)
    return found + ([inner] if inner is not None else [])


@torch.no_grad()
def _randomise_params(modules: list[nn.Module], seed: int) -> None:
    """Give the norms distinct affine parameters (and DyT α), so each slot's module is distinguishable."""
    g = torch.Generator().manual_seed(seed)
    for m in modules:
        for p in m.parameters():
            p.mul_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _randomise_norms(block: nn.Module, seed: int = 0) -> None:
    _randomise_params(_norm_modules(block), seed)


@torch.no_grad()
def _reset_norms(block: nn.Module) -> None:
    for m in _norm_modules(block):
        m.reset_parameters()


def _block(placement: str, norm: str = "layer_norm", layer_idx: int = 1, **kwargs: Any) -> Block:
    cfg = _config(placement, norm, **kwargs)
    block = Block(cfg, layer_idx, placement, n_tokens=N).double()
    for m in _norm_modules(block):
        assert isinstance(m, get_norm(norm).cls)  # the slot really holds the norm under test
    _randomise_norms(block)
    return block


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


def _stat(t: Tensor, norm: str) -> tuple[Tensor, Tensor] | None:
    """The statistics a norm drives to (0, 1): mean and variance over its reduced axes (mean square for rms)."""
    if norm == "layer_norm":
        return t.mean(-1), t.var(-1, unbiased=False)
    if norm == "rms_norm":
        return torch.zeros_like(t[..., 0]), t.pow(2).mean(-1)
    if norm == "batch_norm":
        flat = t.reshape(-1, t.shape[-1])
        return flat.mean(0), flat.var(0, unbiased=False)
    return None


def _assert_normalised(t: Tensor, norm: str) -> None:
    stat = _stat(t, norm)
    if stat is None:  # dyt: bounded by tanh at the default init (γ = 1, β = 0)
        assert t.abs().max() < 1
        return
    mean, second = stat
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-9)
    torch.testing.assert_close(second, torch.ones_like(second), rtol=0, atol=1e-8)


def _assert_not_normalised(t: Tensor, norm: str) -> None:
    stat = _stat(t, norm)
    if stat is None:
        assert t.abs().max() > 1.05
        return
    assert (stat[1] - 1).abs().max() > 0.05


def _x() -> Tensor:
    return 3.0 * torch.randn(2, N, D, dtype=torch.float64) + 1.0


@pytest.mark.parametrize("norm", NORMS)
def test_pre_ln_equation(norm: str) -> None:
    block, x = _block("pre", norm), _x()
    s = _run(block, x)
    torch.testing.assert_close(s["attn_in"], block.attn_in_norm(x))
    h = x + s["attn_out"]
    torch.testing.assert_close(s["mlp_in"], block.mlp_in_norm(h))
    torch.testing.assert_close(s["y"], h + s["mlp_out"])
    assert block.out_norm_position is None and block.attn_out_norm is None and block.mlp_out_norm is None
    _reset_norms(block)
    s = _run(block, x)
    _assert_normalised(s["attn_in"], norm)
    _assert_normalised(s["mlp_in"], norm)
    _assert_not_normalised(s["y"], norm)  # the identity path is never normalised
    if norm == "layer_norm":  # and against a reference computed without the block's module
        torch.testing.assert_close(s["attn_in"], _ln(x))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("placement", ["post", "deepnorm"])
def test_post_ln_and_deepnorm_equations(placement: str, norm: str) -> None:
    block, x = _block(placement, norm), _x()
    alpha = (2 * L) ** 0.25 if placement == "deepnorm" else 1.0
    assert block.resid_alpha == pytest.approx(alpha)
    s = _run(block, x)
    torch.testing.assert_close(s["attn_in"], x)  # no input norm
    h = block.attn_out_norm(alpha * x + s["attn_out"])  # x_{l+1} = N(α x_l + G(x_l))
    torch.testing.assert_close(s["mlp_in"], h)
    torch.testing.assert_close(s["y"], block.mlp_out_norm(alpha * h + s["mlp_out"]))
    assert block.out_norm_position == "after_add" and block.attn_in_norm is None and block.mlp_in_norm is None
    _reset_norms(block)
    s = _run(block, x)
    _assert_normalised(s["mlp_in"], norm)
    _assert_normalised(s["y"], norm)  # the output of a Post-LN block is normalised
    if norm == "layer_norm":
        torch.testing.assert_close(s["y"], _ln(alpha * s["mlp_in"] + s["mlp_out"]))


def test_deepnorm_alpha_changes_the_output() -> None:
    block, x = _block("deepnorm"), _x()
    y = block(x, is_causal=True)
    block.resid_alpha = 1.0
    assert not torch.allclose(block(x, is_causal=True), y)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("placement", ["peri", "sandwich"])
def test_peri_and_sandwich_normalise_the_branch_output_before_the_add(placement: str, norm: str) -> None:
    block, x = _block(placement, norm), _x()
    s = _run(block, x)
    torch.testing.assert_close(s["attn_in"], block.attn_in_norm(x))
    h = x + block.attn_out_norm(s["attn_out"])
    torch.testing.assert_close(s["mlp_in"], block.mlp_in_norm(h))
    torch.testing.assert_close(s["y"], h + block.mlp_out_norm(s["mlp_out"]))
    assert block.out_norm_position == "branch"
    _reset_norms(block)
    s = _run(block, x)
    h = x + block.attn_out_norm(s["attn_out"])
    _assert_normalised(h - x, norm)  # each branch adds a normalised vector
    _assert_normalised(s["y"] - h, norm)
    _assert_not_normalised(s["y"], norm)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layer_idx", [1, 2, 3, 4])
def test_lns_scales_the_in_block_norm_outputs_by_inverse_sqrt_layer(layer_idx: int, norm: str) -> None:
    block, x = _block("lns", norm, layer_idx), _x()
    assert block.branch_scale == pytest.approx(1 / math.sqrt(layer_idx))
    s = _run(block, x)
    torch.testing.assert_close(s["attn_in"], block.attn_in_norm(x) / math.sqrt(layer_idx))
    h = x + s["attn_out"]
    torch.testing.assert_close(s["mlp_in"], block.mlp_in_norm(h) / math.sqrt(layer_idx))
    torch.testing.assert_close(s["y"], h + s["mlp_out"])
    _reset_norms(block)
    s = _run(block, x)
    _assert_normalised(s["attn_in"] * math.sqrt(layer_idx), norm)
    _assert_normalised(s["mlp_in"] * math.sqrt(layer_idx), norm)
    if norm == "layer_norm":
        var = s["attn_in"].var(-1, unbiased=False)
        torch.testing.assert_close(var, torch.full_like(var, 1 / layer_idx))


@pytest.mark.parametrize("norm", NORMS)
def test_lns_in_a_model_is_one_based_and_leaves_the_final_norm_unscaled(norm: str) -> None:
    model = DecoderLM(_config("lns", norm)).double()
    assert [b.layer_idx for b in model.blocks] == [1, 2, 3, 4]
    assert [b.branch_scale for b in model.blocks] == pytest.approx([1, 2**-0.5, 3**-0.5, 0.5])
    assert model.final_norm is not None
    _randomise_params([model.final_norm], seed=1)  # so a scaled or skipped final norm shows in the logits
    ids = torch.randint(0, 256, (2, N))
    out = model(ids, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == L + 1
    torch.testing.assert_close(out.hidden_states[0], model.embed(ids) + model.pos_embed[:, :N])
    for block, before, after in zip(model.blocks, out.hidden_states[:-1], out.hidden_states[1:]):
        torch.testing.assert_close(after, block(before, is_causal=True))
    torch.testing.assert_close(out.logits, model.lm_head(model.final_norm(out.hidden_states[-1])))
    with torch.no_grad():
        model.final_norm.reset_parameters()
    seen: dict[str, Tensor] = {}
    model.final_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("final", o))
    model(ids)
    _assert_normalised(seen["final"], norm)


def test_mix_ln_switches_at_floor_alpha_l() -> None:
    assert block_placements(_config("mix", n_layers=8)) == ["post"] * 2 + ["pre"] * 6
    assert block_placements(_config("mix", n_layers=6)) == ["post"] + ["pre"] * 5  # floor(1.5) = 1
    assert block_placements(_config("mix", n_layers=8, mix_alpha=0.5)) == ["post"] * 4 + ["pre"] * 4
    assert block_placements(_config("mix", n_layers=8, mix_alpha=0.0)) == ["pre"] * 8
    assert block_placements(_config("mix", n_layers=8, mix_alpha=1.0)) == ["post"] * 8


@pytest.mark.parametrize("norm", NORMS)
def test_mix_ln_blocks_obey_their_own_equations(norm: str) -> None:
    model = DecoderLM(_config("mix", norm, n_layers=8)).double()
    assert [b.placement for b in model.blocks] == ["post", "post"] + ["pre"] * 6
    x = _x()
    post, pre = model.blocks[1], model.blocks[2]
    _randomise_norms(post, seed=2)
    _randomise_norms(pre, seed=3)
    s = _run(post, x)
    assert post.attn_in_norm is None and post.mlp_in_norm is None and post.out_norm_position == "after_add"
    torch.testing.assert_close(s["attn_in"], x)
    torch.testing.assert_close(s["mlp_in"], post.attn_out_norm(x + s["attn_out"]))
    torch.testing.assert_close(s["y"], post.mlp_out_norm(s["mlp_in"] + s["mlp_out"]))
    t = _run(pre, x)
    assert pre.attn_out_norm is None and pre.mlp_out_norm is None and pre.attn_in_norm is not None
    torch.testing.assert_close(t["attn_in"], pre.attn_in_norm(x))
    h = x + t["attn_out"]
    torch.testing.assert_close(t["mlp_in"], pre.mlp_in_norm(h))
    torch.testing.assert_close(t["y"], h + t["mlp_out"])
    _reset_norms(post)
    _reset_norms(pre)
    _assert_normalised(_run(post, x)["y"], norm)
    _assert_not_normalised(_run(pre, x)["y"], norm)


@pytest.mark.parametrize("norm", NORMS)
def test_normformer_extras(norm: str) -> None:
    block, x = _block("normformer", norm), _x()
    assert block.mlp_out_norm is None and block.attn_out_norm is not None
    assert block.mlp.inner_norm is not None and block.mlp.inner_norm.num_features == 4 * D
    assert block.attn.head_scale is not None
    torch.testing.assert_close(block.attn.head_scale.detach(), torch.ones(2, dtype=torch.float64))
    seen: dict[str, Tensor] = {}
    block.mlp.fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("fc2_in", a[0]))
    s = _run(block, x)
    torch.testing.assert_close(s["attn_in"], block.attn_in_norm(x))
    h = x + block.attn_out_norm(s["attn_out"])  # post-attention norm before the add
    torch.testing.assert_close(s["mlp_in"], block.mlp_in_norm(h))
    # the FFN's own norm after the activation
    torch.testing.assert_close(seen["fc2_in"], block.mlp.inner_norm(F.gelu(block.mlp.fc1(s["mlp_in"]))))
    torch.testing.assert_close(s["y"], h + s["mlp_out"])  # no norm on the FFN output
    _reset_norms(block)
    s = _run(block, x)
    _assert_normalised(seen["fc2_in"], norm)
    if norm != "dyt":  # a small FFN output is inside (-1, 1) anyway, so only the statistic norms can tell
        _assert_not_normalised(s["y"] - (x + block.attn_out_norm(s["attn_out"])), norm)


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


def test_normformer_resscale_scales_the_ffn_skip_path_only() -> None:
    assert _block("normformer").resid_scale is None  # off by default
    block, x = _block("normformer", resid_scale=True), _x()
    assert isinstance(block.resid_scale, nn.Parameter)
    torch.testing.assert_close(block.resid_scale.detach(), torch.ones(D, dtype=torch.float64))
    plain = Block(_config("normformer"), 1, "normformer", n_tokens=N).double()
    missing, unexpected = plain.load_state_dict(block.state_dict(), strict=False)
    assert unexpected == ["resid_scale"] and not missing
    torch.testing.assert_close(block(x, is_causal=True), plain(x, is_causal=True))  # λ = 1 at init: no change
    lam = 0.5 + torch.rand(D, dtype=torch.float64)
    with torch.no_grad():
        block.resid_scale.copy_(lam)
    s = _run(block, x)
    h = x + block.attn_out_norm(s["attn_out"])  # the attention skip is not scaled
    torch.testing.assert_close(s["mlp_in"], block.mlp_in_norm(h))
    torch.testing.assert_close(s["y"], lam * h + s["mlp_out"])  # x ← λ ⊙ h + FFN(N(h))
    s["y"].sum().backward()
    assert block.resid_scale.grad is not None and block.resid_scale.grad.abs().sum() > 0


def test_mix_ln_by_count_in_a_model() -> None:
    model = DecoderLM(_config("mix", n_layers=8, mix_post_layers=3))
    assert [b.placement for b in model.blocks] == ["post"] * 3 + ["pre"] * 5
    assert block_placements(_config("mix", n_layers=8, mix_post_layers=0)) == ["pre"] * 8
