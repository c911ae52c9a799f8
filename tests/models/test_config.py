"""Tests of normlab/models/config.py: validation, serialisation, slot bookkeeping, DeepNorm coefficients."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest

from normlab.models import DecoderLM, TransformerConfig, deepnorm_coefficients
from normlab.nn import LayerNorm


def test_defaults_match_the_contract() -> None:
    cfg = TransformerConfig()
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.mlp, cfg.mlp_ratio) == (128, 4, 4, "gelu", 4.0)
    assert (cfg.norm, cfg.placement, cfg.qk_norm, cfg.qk_norm_per_head) == ("layer_norm", "pre", "none", True)
    assert (cfg.final_norm, cfg.sigma_reparam, cfg.mix_alpha, cfg.dropout) == (True, False, 0.25, 0.0)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.causal) == (256, 256, True)
    assert cfg.d_head == 32 and cfg.d_ffn == 512


def test_asdict_is_json_and_round_trips() -> None:
    cfg = TransformerConfig(
        d_model=64,
        placement="mix",
        norm="rms_norm",
        norm_kwargs={"eps": 1e-6},
        norm_overrides={"final": "layer_norm", "attn_in": {"kwargs": {"eps": 1e-5}}, "mlp_out": None},
        qk_norm="rms",
        qk_norm_per_head=False,
    )
    text = json.dumps(dataclasses.asdict(cfg))
    back = TransformerConfig.from_dict(json.loads(text))
    assert back == cfg
    assert back.to_dict() == dataclasses.asdict(cfg)


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown keys \['d_modle'\]"):
        TransformerConfig.from_dict({"d_modle": 64})
    with pytest.raises(TypeError, match="expected a dict"):
        TransformerConfig.from_dict([("d_model", 64)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"placement": "prenorm"}, ValueError, r"expected placement in .*'pre'.*got 'prenorm'"),
        ({"d_model": 30, "n_heads": 4}, ValueError, "d_model divisible by n_heads, got d_model=30, n_heads=4"),
        ({"n_layers": 0}, ValueError, "expected n_layers to be an int >= 1, got 0"),
        ({"mlp": "relu"}, ValueError, r"expected mlp in \('gelu', 'swiglu'\), got 'relu'"),
        ({"qk_norm": "l1"}, ValueError, r"expected qk_norm in .*got 'l1'"),
        ({"qk_norm": "l2", "qk_norm_per_head": False}, ValueError, "qk_norm_per_head=True, got False"),
        ({"mix_alpha": 1.5}, ValueError, r"expected mix_alpha in \[0.0, 1.0\], got 1.5"),
        ({"dropout": 1.0}, ValueError, r"expected dropout in \[0.0, 1.0\), got 1.0"),
        ({"mlp_ratio": 0}, ValueError, "expected mlp_ratio to be a positive number, got 0"),
        ({"final_norm": 1}, TypeError, "expected final_norm to be a bool, got 1"),
        ({"image_size": 30, "patch_size": 4}, ValueError, "image_size divisible by patch_size"),
        ({"norm": 3}, TypeError, "expected norm to be a registry key, a norm class or a partial, got int"),
        ({"norm_overrides": {"attn_mid": "rms_norm"}}, ValueError, "unknown norm_overrides slot 'attn_mid'"),
        ({"norm_overrides": {"attn_out": "rms_norm"}}, ValueError, r"slot\(s\) \['attn_out'\] that placement='pre'"),
        ({"norm_overrides": {"qk": "rms_norm"}}, ValueError, r"slot\(s\) \['qk'\]"),
        ({"norm_overrides": {"final": "rms_norm"}, "final_norm": False}, ValueError, r"slot\(s\) \['final'\]"),
        ({"norm_overrides": {"final": {"norm": "rms_norm", "kw": {}}}}, ValueError, r"unknown keys \['kw'\]"),
        ({"norm_kwargs": [1]}, TypeError, "expected norm_kwargs to be a dict, got list"),
    ],
)
def test_invalid_values_raise(kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        TransformerConfig(**kwargs)


def test_unknown_norm_key_raises_the_registry_keyerror() -> None:
    with pytest.raises(KeyError, match="unknown norm 'layer_nrom'; did you mean 'layer_norm'"):
        TransformerConfig(norm="layer_nrom")
    with pytest.raises(KeyError, match="unknown norm 'nope'"):
        TransformerConfig(norm_overrides={"final": {"norm": "nope"}})


def test_norm_may_be_a_class_or_partial() -> None:
    assert TransformerConfig(norm=LayerNorm).norm is LayerNorm
    TransformerConfig(norm=functools.partial(LayerNorm, eps=1e-3))


@pytest.mark.parametrize(
    ("placement", "slots"),
    [
        ("pre", ("attn_in", "mlp_in", "final")),
        ("lns", ("attn_in", "mlp_in", "final")),
        ("post", ("attn_out", "mlp_out", "final")),
        ("deepnorm", ("attn_out", "mlp_out", "final")),
        ("peri", ("attn_in", "attn_out", "mlp_in", "mlp_out", "final")),
        ("sandwich", ("attn_in", "attn_out", "mlp_in", "mlp_out", "final")),
        ("normformer", ("attn_in", "attn_out", "mlp_in", "final", "mlp_inner")),
        ("mix", ("attn_in", "attn_out", "mlp_in", "mlp_out", "final")),
    ],
)
def test_slots_in_use(placement: str, slots: tuple[str, ...]) -> None:
    assert TransformerConfig(placement=placement).slots_in_use() == slots


@pytest.mark.parametrize(
    ("n_layers", "mix_alpha", "slots"),
    [
        (3, 0.25, ("attn_in", "mlp_in", "final")),  # floor(0.75) = 0: every block Pre-LN
        (4, 0.0, ("attn_in", "mlp_in", "final")),
        (4, 0.25, ("attn_in", "attn_out", "mlp_in", "mlp_out", "final")),  # 1 Post-LN block, 3 Pre-LN
        (4, 0.9, ("attn_in", "attn_out", "mlp_in", "mlp_out", "final")),  # floor(3.6) = 3: one Pre-LN block left
        (4, 1.0, ("attn_out", "mlp_out", "final")),  # every block Post-LN
        (2, 0.5, ("attn_in", "attn_out", "mlp_in", "mlp_out", "final")),
    ],
)
def test_mix_slots_follow_the_blocks_that_exist(n_layers: int, mix_alpha: float, slots: tuple[str, ...]) -> None:
    assert TransformerConfig(placement="mix", n_layers=n_layers, mix_alpha=mix_alpha).slots_in_use() == slots


@pytest.mark.parametrize(
    ("n_layers", "mix_alpha", "slot"),
    [(4, 1.0, "attn_in"), (4, 1.0, "mlp_in"), (3, 0.25, "attn_out"), (4, 0.0, "mlp_out")],
)
def test_mix_override_of_a_slot_no_block_has_is_an_error(n_layers: int, mix_alpha: float, slot: str) -> None:
    match = rf"slot\(s\) \['{slot}'\] that placement='mix' \(mix_alpha={mix_alpha}: \d of {n_layers} blocks Post-LN\)"
    with pytest.raises(ValueError, match=match):
        TransformerConfig(placement="mix", n_layers=n_layers, mix_alpha=mix_alpha, norm_overrides={slot: "rms_norm"})


def test_mix_slots_in_use_are_the_slots_the_model_builds() -> None:
    for n_layers, mix_alpha in ((3, 0.25), (4, 0.5), (4, 1.0)):
        cfg = TransformerConfig(d_model=16, n_heads=2, placement="mix", n_layers=n_layers, mix_alpha=mix_alpha)
        model = DecoderLM(cfg)
        built = {
            slot
            for b in model.blocks
            for slot in ("attn_in", "attn_out", "mlp_in", "mlp_out")
            if getattr(b, f"{slot}_norm") is not None
        }
        assert built | {"final"} == set(cfg.slots_in_use()), (n_layers, mix_alpha)


@pytest.mark.parametrize(("m", "alpha", "beta"), [(6, 1.861, 0.380), (12, 2.213, 0.320), (24, 2.632, 0.269)])
def test_deepnorm_coefficients_match_the_deepnet_formulas(m: int, alpha: float, beta: float) -> None:
    a, b = deepnorm_coefficients(m, "decoder")
    # DeepNet's decoder-only α = (2M)^(1/4), β = (8M)^(-1/4), rounded to 3 digits (0.320 for M=12 is 0.3195 rounded up).
    assert a == pytest.approx(alpha, abs=1e-3) and b == pytest.approx(beta, abs=1e-3)
    assert deepnorm_coefficients(m, "encoder") == (a, b)  # encoder-only uses the same formulas with N blocks
    assert math.isclose(a, (2 * m) ** 0.25) and math.isclose(b, (8 * m) ** -0.25)


def test_deepnorm_coefficients_errors() -> None:
    with pytest.raises(ValueError, match="expected arch 'decoder' or 'encoder', got 'encdec'"):
        deepnorm_coefficients(6, "encdec")
    with pytest.raises(ValueError, match="expected n_layers to be an int >= 1, got 0"):
        deepnorm_coefficients(0)


def test_model_options_default_to_off() -> None:
    cfg = TransformerConfig()
    assert (cfg.embed_norm, cfg.embed_scale, cfg.mix_post_layers, cfg.resid_scale) == (None, None, None, False)
    assert cfg.embed_multiplier is None


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"embed_scale": "sqrt"}, ValueError, r"expected embed_scale to be None, 'sqrt_d' or a positive .*got 'sqrt'"),
        ({"embed_scale": 0}, ValueError, "expected embed_scale .* got 0"),
        ({"embed_scale": -2.0}, ValueError, r"expected embed_scale .* got -2\.0"),
        ({"embed_scale": math.inf}, ValueError, "expected embed_scale .* got inf"),
        ({"embed_scale": True}, ValueError, "expected embed_scale .* got True"),
        ({"embed_norm": 3}, TypeError, "expected embed_norm to be a registry key, a norm class or a partial, got int"),
        ({"embed_norm": {"kwargs": {"eps": 1e-5}}}, ValueError, r"expected embed_norm to name a norm \('norm' key\)"),
        ({"embed_norm": {"norm": "rms_norm", "kw": {}}}, ValueError, r"embed_norm has unknown keys \['kw'\]"),
        ({"embed_norm": {"norm": "rms_norm", "kwargs": 1}}, TypeError, r"expected embed_norm\['kwargs'\] to be a dict"),
        (
            {"mix_post_layers": 1},
            ValueError,
            r"mix_post_layers=1 applies to placement in \('mix',\), got placement='pre'",
        ),
        (
            {"placement": "mix", "mix_post_layers": 5},
            ValueError,
            r"expected mix_post_layers to be None or an int in \[0, n_layers=4\], got 5",
        ),
        ({"placement": "mix", "mix_post_layers": -1}, ValueError, "expected mix_post_layers .* got -1"),
        ({"placement": "mix", "mix_post_layers": 1.0}, ValueError, r"expected mix_post_layers .* got 1\.0"),
        (
            {"placement": "mix", "mix_post_layers": 2, "mix_alpha": 0.5},
            ValueError,
            "as mix_alpha or as mix_post_layers, not both; got mix_alpha=0.5 and mix_post_layers=2",
        ),
        (
            {"resid_scale": True},
            ValueError,
            r"resid_scale=True applies to placement in \('normformer',\), got .*'pre'",
        ),
        ({"placement": "normformer", "resid_scale": 1}, TypeError, "expected resid_scale to be a bool, got 1"),
    ],
)
def test_invalid_model_options_raise(kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        TransformerConfig(**kwargs)


def test_unknown_embed_norm_key_raises_the_registry_keyerror() -> None:
    with pytest.raises(KeyError, match="unknown norm 'layer_nrom'"):
        TransformerConfig(embed_norm="layer_nrom")


def test_embed_multiplier() -> None:
    assert TransformerConfig(d_model=64, embed_scale="sqrt_d").embed_multiplier == 8.0
    assert TransformerConfig(embed_scale=2.5).embed_multiplier == 2.5
    assert TransformerConfig(embed_scale=3).embed_multiplier == 3.0


def test_mix_by_count_keeps_the_block_that_floor_alpha_l_loses() -> None:
    # 15/22 * 22 is 14.999999999999998 in binary floating point, so the α form gives 14 Post-LN blocks, not 15.
    by_alpha = TransformerConfig(placement="mix", n_layers=22, mix_alpha=15 / 22)
    by_count = TransformerConfig(placement="mix", n_layers=22, mix_post_layers=15)
    assert by_alpha.n_post_layers == 14
    assert by_count.n_post_layers == 15
    assert TransformerConfig(placement="mix", n_layers=4, mix_post_layers=0).n_post_layers == 0
    assert TransformerConfig(placement="mix", n_layers=4, mix_post_layers=4).slots_in_use() == (
        "attn_out",
        "mlp_out",
        "final",
    )
    with pytest.raises(ValueError, match=r"\(mix_post_layers=4: 4 of 4 blocks Post-LN\)"):
        TransformerConfig(placement="mix", n_layers=4, mix_post_layers=4, norm_overrides={"attn_in": "rms_norm"})


def test_model_options_round_trip_through_json() -> None:
    cfg = TransformerConfig(
        placement="mix",
        mix_post_layers=3,
        embed_norm={"norm": "rms_norm", "kwargs": {"eps": 1e-6}},
        embed_scale="sqrt_d",
    )
    back = TransformerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.n_post_layers == 3
    nf = TransformerConfig(placement="normformer", resid_scale=True, embed_norm="layer_norm", embed_scale=2.0)
    assert TransformerConfig.from_dict(json.loads(json.dumps(nf.to_dict()))) == nf
