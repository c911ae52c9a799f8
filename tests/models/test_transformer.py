"""Tests of normlab/models/transformer.py: DecoderLM training on every placement x norm, padding masks, loss,
hidden states, the per-placement init rules (DeepNorm β, Sandwich scaled init, σReparam) and input errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from normlab import list_norms
from normlab.models import PLACEMENTS, DecoderLM, TransformerConfig
from normlab.models.layers import is_batch_dependent
from normlab.nn import DyT
from normlab.nn.sigma_reparam import SigmaReparamLinear

N = 8


def _tiny(**kwargs: Any) -> TransformerConfig:
    base: dict[str, Any] = {"d_model": 16, "n_layers": 4, "n_heads": 2, "vocab_size": 32, "max_seq_len": N}
    base.update(kwargs)
    return TransformerConfig(**base)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm", "dyt", "batch_norm"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_placement_and_norm_trains(placement: str, norm: str) -> None:
    model = DecoderLM(_tiny(placement=placement, norm=norm))
    ids = torch.randint(0, 32, (4, N))
    mask = torch.ones(4, N, dtype=torch.long)
    mask[0, 5:] = 0
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):  # three optimizer steps, then the loss after them
        loss = model(ids, attention_mask=mask, labels=ids).loss
        assert loss is not None and torch.isfinite(loss)
        losses.append(float(loss.detach()))
        if len(losses) == 4:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]  # a fixed batch: three Adam steps must fit it a little
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert sum(changed) >= 0.9 * len(changed)


@pytest.mark.parametrize("placement", ["pre", "post", "peri", "normformer"])
def test_valid_outputs_ignore_padded_content_with_batch_norm(placement: str) -> None:
    cfg = _tiny(
        placement=placement, norm="batch_norm", qk_norm="rms", norm_overrides={"qk": "batch_norm"}, final_norm=True
    )
    model = DecoderLM(cfg).train()
    for block in model.blocks:
        assert is_batch_dependent(block.attn.q_norm)
    ids = torch.randint(0, 32, (3, N))
    mask = torch.ones(3, N, dtype=torch.bool)
    mask[0, :3] = False  # left padding: attention must not look at it
    mask[1, 6:] = False  # right padding
    other = ids.clone()
    other[~mask] = (ids[~mask] + 7) % 32
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out_a = model(ids, attention_mask=mask, labels=ids)
    stats_a = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.load_state_dict(state)
    out_b = model(other, attention_mask=mask, labels=other)
    stats_b = {k: v for k, v in model.state_dict().items() if "running" in k}
    torch.testing.assert_close(out_a.logits[mask], out_b.logits[mask])
    torch.testing.assert_close(out_a.loss, out_b.loss)
    for key in stats_a:
        torch.testing.assert_close(stats_a[key], stats_b[key])
    model.load_state_dict(state)
    no_mask_a = model(ids).logits
    no_mask_b = model(other).logits
    assert not torch.allclose(no_mask_a[mask], no_mask_b[mask])  # without the mask the pads do leak in


def test_loss_is_shifted_next_token_ce_ignoring_minus_100_and_padding() -> None:
    model = DecoderLM(_tiny())
    ids = torch.randint(0, 32, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, 5:] = 0
    mask[0, :2] = 0  # left padding: the pair (1 -> 2) is predicted from a pad, so it is ignored too
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, attention_mask=mask, labels=labels)
    logits, targets = out.logits[:, :-1], labels[:, 1:].clone()
    targets[1, 4:] = -100  # targets at padded positions 5..7
    targets[0, :2] = -100  # predictions made at padded positions 0 and 1
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)
    assert model(ids).loss is None


def test_hidden_states_are_embeddings_plus_each_block() -> None:
    model = DecoderLM(_tiny(placement="peri")).eval()
    ids = torch.randint(0, 32, (2, N))
    out = model(ids, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == 5
    torch.testing.assert_close(out.hidden_states[0], model.embed(ids) + model.pos_embed[:, :N])
    x = out.hidden_states[0]
    for block, h in zip(model.blocks, out.hidden_states[1:]):
        x = block(x, is_causal=True)
        torch.testing.assert_close(h, x)
    torch.testing.assert_close(out.logits, model.lm_head(model.final_norm(x)))
    assert model(ids).hidden_states is None


def test_causal_mask() -> None:
    model = DecoderLM(_tiny()).eval()
    ids = torch.randint(0, 32, (1, N))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 32
    torch.testing.assert_close(model(ids).logits[:, :-1], model(changed).logits[:, :-1])
    bidir = DecoderLM(_tiny(causal=False)).eval()
    assert not torch.allclose(bidir(ids).logits[:, 0], bidir(changed).logits[:, 0])


def test_padding_mask_equals_running_the_unpadded_sequence() -> None:
    model = DecoderLM(_tiny(placement="sandwich", norm="rms_norm")).eval()
    ids = torch.randint(0, 32, (1, N))
    mask = torch.ones(1, N, dtype=torch.long)
    mask[0, 5:] = 0
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[:, :5], model(ids[:, :5]).logits)


def _xavier_std(lin: torch.nn.Module) -> float:
    out_f, in_f = lin.weight.shape
    return math.sqrt(2.0 / (in_f + out_f))


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_deepnorm_beta_init(mlp: str) -> None:
    cfg = TransformerConfig(d_model=128, n_layers=6, n_heads=4, placement="deepnorm", mlp=mlp, vocab_size=32)
    model = DecoderLM(cfg)
    beta = (8 * 6) ** -0.25
    block = model.blocks[0]
    ffn = ["fc1", "fc2"] if mlp == "gelu" else ["gate_proj", "up_proj", "down_proj"]
    for lin in [block.attn.v_proj, block.attn.out_proj, *(getattr(block.mlp, n) for n in ffn)]:
        assert float(lin.weight.detach().std()) == pytest.approx(beta * _xavier_std(lin), rel=0.05)
        assert torch.count_nonzero(lin.bias) == 0
    for lin in (block.attn.q_proj, block.attn.k_proj):
        assert float(lin.weight.detach().std()) == pytest.approx(_xavier_std(lin), rel=0.05)
    assert block.resid_alpha == pytest.approx(12**0.25)


def test_sandwich_scaled_init_and_gpt2_init_elsewhere() -> None:
    cfg = dict(d_model=128, n_layers=8, n_heads=4, vocab_size=32)
    sandwich, peri = (
        DecoderLM(TransformerConfig(placement="sandwich", **cfg)),
        DecoderLM(TransformerConfig(placement="peri", **cfg)),
    )
    scaled = 0.02 / math.sqrt(16)
    for name in ("attn.out_proj", "mlp.fc2"):
        assert float(sandwich.blocks[3].get_submodule(name).weight.detach().std()) == pytest.approx(scaled, rel=0.05)
        assert float(peri.blocks[3].get_submodule(name).weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(sandwich.blocks[3].attn.q_proj.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(peri.embed.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(peri.pos_embed.detach().std()) == pytest.approx(0.01, rel=0.05)


def test_sigma_reparam_replaces_block_linears_and_starts_equal_to_the_plain_init() -> None:
    model = DecoderLM(_tiny(sigma_reparam=True, placement="post")).double()
    block = model.blocks[0]
    names = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc1", "mlp.fc2"]
    for name in names:
        lin = block.get_submodule(name)
        assert isinstance(lin, SigmaReparamLinear)
        exact = torch.linalg.matrix_norm(lin.weight.detach(), ord=2)
        torch.testing.assert_close(lin.sigma, exact)  # recomputed after the N(0, 0.02) re-init
        torch.testing.assert_close(lin.effective_weight().detach(), lin.weight.detach())
    model(torch.randint(0, 32, (2, N)), labels=torch.randint(0, 32, (2, N))).loss.backward()
    assert block.attn.q_proj.gamma.grad is not None


def test_dyt_alpha_defaults_in_the_decoder() -> None:
    model = DecoderLM(_tiny(norm="dyt", placement="peri"))
    block = model.blocks[0]
    assert isinstance(block.attn_in_norm, DyT) and block.attn_in_norm.alpha_init == 0.8
    for norm in (block.attn_out_norm, block.mlp_in_norm, block.mlp_out_norm, model.final_norm):
        assert isinstance(norm, DyT) and norm.alpha_init == 0.2
    explicit = DecoderLM(_tiny(norm="dyt", norm_kwargs={"alpha_init": 0.5}))
    assert {m.alpha_init for m in explicit.modules() if isinstance(m, DyT)} == {0.5}


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        ("post", {"attn_out": 0.2, "mlp_out": 0.2}),  # no attention-input slot: 0.2 everywhere (see DecoderLM)
        ("deepnorm", {"attn_out": 0.2, "mlp_out": 0.2}),
        ("normformer", {"attn_in": 0.8, "attn_out": 0.2, "mlp_in": 0.2}),
        ("lns", {"attn_in": 0.8, "mlp_in": 0.2}),
    ],
)
def test_dyt_alpha_defaults_per_placement(placement: str, expected: dict[str, float]) -> None:
    model = DecoderLM(_tiny(norm="dyt", placement=placement))
    for block in model.blocks:
        got = {
            s: m.alpha_init for s in ("attn_in", "attn_out", "mlp_in", "mlp_out") if (m := getattr(block, f"{s}_norm"))
        }
        assert got == expected
    assert {m.alpha_init for m in model.modules() if isinstance(m, DyT)} == set(expected.values()) | {0.2}
    assert model.final_norm is not None and model.final_norm.alpha_init == 0.2


def test_dyt_alpha_defaults_for_mix_ln_and_qk() -> None:
    model = DecoderLM(_tiny(norm="dyt", placement="mix", n_layers=4, mix_alpha=0.5))
    post, pre = model.blocks[0], model.blocks[-1]
    assert (post.attn_out_norm.alpha_init, post.mlp_out_norm.alpha_init) == (0.2, 0.2)
    assert (pre.attn_in_norm.alpha_init, pre.mlp_in_norm.alpha_init) == (0.8, 0.2)
    qk = DecoderLM(_tiny(qk_norm="rms", norm_overrides={"qk": "dyt"}))
    assert {m.alpha_init for m in qk.modules() if isinstance(m, DyT)} == {0.5}


def test_final_norm_off_and_slot_override_none() -> None:
    model = DecoderLM(_tiny(final_norm=False, placement="peri", norm_overrides={"attn_in": None, "mlp_in": None}))
    assert model.final_norm is None
    assert all(b.attn_in_norm is None and b.mlp_in_norm is None and b.attn_out_norm is not None for b in model.blocks)
    assert torch.isfinite(model(torch.randint(0, 32, (2, N))).logits).all()


def test_config_is_stored_and_rebuilds_the_same_model() -> None:
    cfg = _tiny(placement="mix", norm="rms_norm", qk_norm="l2")
    model = DecoderLM(cfg)
    clone = DecoderLM(TransformerConfig.from_dict(cfg.to_dict()))
    clone.load_state_dict(model.state_dict())
    ids = torch.randint(0, 32, (2, N))
    torch.testing.assert_close(clone(ids).logits, model(ids).logits)


def test_input_errors() -> None:
    model = DecoderLM(_tiny())
    with pytest.raises(TypeError, match="expected input_ids to be an integer"):
        model(torch.randn(2, N))
    with pytest.raises(ValueError, match=r"expected input_ids of shape \[B, N\], got size \[8\]"):
        model(torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError, match=f"sequence length {N + 1} exceeds max_seq_len={N}"):
        model(torch.zeros(1, N + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected attention_mask of size \[2, 8\], got \[2, 7\]"):
        model(torch.zeros(2, N, dtype=torch.long), attention_mask=torch.ones(2, N - 1))
    with pytest.raises(TypeError, match="expected a TransformerConfig, got dict"):
        DecoderLM({"d_model": 16})  # type: ignore[arg-type]


# Every norm that takes token tensors: the channel-first-only ones (conv-net norms) have no place in a Transformer.
@pytest.mark.parametrize("name", [s.name for s in list_norms() if s.layout != "channel_first"])
def test_every_registered_norm_builds_and_backpropagates_in_the_decoder(name: str) -> None:
    model = DecoderLM(_tiny(norm=name, placement="peri", n_layers=2))
    ids = torch.randint(0, 32, (3, N))
    mask = torch.ones(3, N, dtype=torch.bool)
    mask[0, :2] = False
    out = model(ids, attention_mask=mask, labels=ids)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", [s.name for s in list_norms(batch_dependent=True) if s.layout != "channel_first"])
def test_every_batch_statistic_norm_gets_the_padding_mask(name: str) -> None:
    model = DecoderLM(_tiny(norm=name, placement="pre", n_layers=2)).train()
    ids = torch.randint(0, 32, (3, N))
    mask = torch.ones(3, N, dtype=torch.bool)
    mask[0, :3] = False
    mask[2, 5:] = False
    other = ids.clone()
    other[~mask] = (ids[~mask] + 11) % 32
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = model(ids, attention_mask=mask).logits
    model.load_state_dict(state)
    b = model(other, attention_mask=mask).logits
    torch.testing.assert_close(a[mask], b[mask])


def _same_weights(cfg: TransformerConfig, **options: Any) -> tuple[DecoderLM, DecoderLM]:
    """The default model of ``cfg`` and one with ``options``, sharing every weight they both have."""
    base = DecoderLM(cfg).eval()
    other = DecoderLM(TransformerConfig.from_dict({**cfg.to_dict(), **options})).eval()
    missing, unexpected = other.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    return base, other


@pytest.mark.parametrize(("embed_scale", "c"), [("sqrt_d", 4.0), (2.5, 2.5)])
def test_embed_scale_multiplies_the_token_embedding(embed_scale: Any, c: float) -> None:
    base, scaled = _same_weights(_tiny(placement="peri"), embed_scale=embed_scale)
    assert scaled.embed_scale == c and base.embed_scale is None
    ids = torch.randint(0, 32, (2, N))
    h0 = scaled(ids, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(h0, c * scaled.embed(ids) + scaled.pos_embed[:, :N])  # positions unscaled
    torch.testing.assert_close(base(ids, output_hidden_states=True).hidden_states[0], base.embed(ids) + base.pos_embed)
    assert not torch.allclose(scaled(ids).logits, base(ids).logits)


@pytest.mark.parametrize("placement", ["peri", "pre", "post"])
def test_embed_norm_normalises_tokens_plus_positions(placement: str) -> None:
    base, normed = _same_weights(_tiny(placement=placement), embed_norm="layer_norm")
    assert base.embed_norm is None and isinstance(normed.embed_norm, torch.nn.Module)
    assert {k for k in normed.state_dict() if k.startswith("embed_norm.")} == {"embed_norm.weight", "embed_norm.bias"}
    ids = torch.randint(0, 32, (2, N))
    out = normed(ids, output_hidden_states=True)
    raw = normed.embed(ids) + normed.pos_embed[:, :N]
    torch.testing.assert_close(out.hidden_states[0], F.layer_norm(raw, (16,), eps=normed.embed_norm.eps))
    # Unit scale instead of std ~0.02 (the eps of 1e-5 is not negligible against the raw variance ~5e-4).
    assert raw.var(-1, unbiased=False).max() < 0.01 and out.hidden_states[0].var(-1, unbiased=False).min() > 0.9
    x = out.hidden_states[0]
    for block in normed.blocks:
        x = block(x, is_causal=True)
    torch.testing.assert_close(out.logits, normed.lm_head(normed.final_norm(x)))
    assert not torch.allclose(out.logits, base(ids).logits)


def test_embed_norm_with_kwargs_and_scale_together() -> None:
    cfg = _tiny(embed_norm={"norm": "rms_norm", "kwargs": {"eps": 1e-3}}, embed_scale="sqrt_d")
    model = DecoderLM(cfg).eval()
    assert model.embed_norm.eps == 1e-3
    ids = torch.randint(0, 32, (2, N))
    raw = 4.0 * model.embed(ids) + model.pos_embed[:, :N]  # scaled first, then normalised
    expected = raw * torch.rsqrt(raw.pow(2).mean(-1, keepdim=True) + 1e-3) * model.embed_norm.weight
    torch.testing.assert_close(model(ids, output_hidden_states=True).hidden_states[0], expected)


def test_batch_statistic_embed_norm_gets_the_padding_mask() -> None:
    model = DecoderLM(_tiny(embed_norm="batch_norm")).train()
    ids = torch.randint(0, 32, (3, N))
    mask = torch.ones(3, N, dtype=torch.bool)
    mask[0, :3] = False
    other = ids.clone()
    other[~mask] = (ids[~mask] + 5) % 32
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = model(ids, attention_mask=mask).logits
    model.load_state_dict(state)
    b = model(other, attention_mask=mask).logits
    torch.testing.assert_close(a[mask], b[mask])
