"""Tests of normlab/models/placement.py: the placement table, checked against what the models build, the README's
placement table, and the one equation every block computes; and a new row added in this file alone."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from normlab.models import (
    BLOCK_PLACEMENTS,
    PLACEMENT_SPECS,
    PLACEMENTS,
    Block,
    DecoderLM,
    PlacementSpec,
    TransformerConfig,
    ViTEncoder,
    get_placement,
)
from normlab.models.layers import apply_norm
from normlab.models.placement import BLOCK_SLOTS, block_placements, deepnorm_coefficients

D, L, N = 16, 4, 6
README = Path(__file__).resolve().parents[2] / "README.md"


def _config(placement: str, **kwargs: Any) -> TransformerConfig:
    base: dict[str, Any] = {"d_model": D, "n_layers": L, "n_heads": 2, "max_seq_len": N, "placement": placement}
    base.update(kwargs)
    return TransformerConfig(**base)


def _built_slots(block: Block) -> set[str]:
    slots = {s for s in ("attn_in", "attn_out", "mlp_in", "mlp_out") if getattr(block, f"{s}_norm") is not None}
    return slots | ({"mlp_inner"} if block.mlp.inner_norm is not None else set())


def test_constants_are_derived_from_the_table() -> None:
    assert PLACEMENTS == tuple(PLACEMENT_SPECS)
    assert BLOCK_PLACEMENTS == tuple(n for n in PLACEMENTS if PLACEMENT_SPECS[n].mixes is None)
    assert "mix" in PLACEMENTS and "mix" not in BLOCK_PLACEMENTS
    for name, spec in PLACEMENT_SPECS.items():
        assert spec.name == name
        for part in spec.mixes or ():
            assert PLACEMENT_SPECS[part].is_block_placement, (name, part)  # a mix of mixes has no blocks


@pytest.mark.parametrize("placement", BLOCK_PLACEMENTS)
@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_blocks_are_built_from_their_row(placement: str, arch: str) -> None:
    spec = get_placement(placement)
    cfg = _config(placement)
    model = DecoderLM(cfg) if arch == "decoder" else ViTEncoder(_config(placement, image_size=8, patch_size=4))
    for i, block in enumerate(model.blocks, start=1):
        assert block.placement == placement and block.layer_idx == i
        assert _built_slots(block) == set(spec.slots)
        assert block.out_norm_position == spec.out_norm_position
        assert (block.attn.head_scale is not None) == spec.head_scale
        assert block.resid_alpha == spec.resid_alpha(i, L, arch)
        assert block.branch_scale == spec.branch_scale(i, L, arch)
    assert set(cfg.slots_in_use()) == set(spec.slots) | {"final"}


def test_rules_of_the_rows() -> None:
    """The rows' constants, against the papers' formulas (not against the rule functions themselves)."""
    for i in range(1, L + 1):
        assert PLACEMENT_SPECS["lns"].branch_scale(i, L, "decoder") == pytest.approx(1 / math.sqrt(i))
        assert PLACEMENT_SPECS["deepnorm"].resid_alpha(i, L, "encoder") == pytest.approx((2 * L) ** 0.25)
        for name in ("pre", "post", "peri", "sandwich", "normformer"):
            spec = PLACEMENT_SPECS[name]
            assert spec.resid_alpha(i, L, "decoder") == 1.0 and spec.branch_scale(i, L, "decoder") == 1.0
    assert deepnorm_coefficients(L)[0] == PLACEMENT_SPECS["deepnorm"].resid_alpha(1, L, "decoder")
    assert {n for n, s in PLACEMENT_SPECS.items() if s.init is not None} == {"sandwich", "deepnorm"}


def test_mix_row_splits_into_its_parts() -> None:
    assert PLACEMENT_SPECS["mix"].mixes == ("post", "pre")
    assert block_placements(_config("mix", n_layers=8, mix_alpha=0.5)) == ["post"] * 4 + ["pre"] * 4
    assert block_placements(_config("peri")) == ["peri"] * L


def _readme_rows() -> dict[str, list[str]]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Placements") :]
    section = section[: section.index("\n## ", 1)]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        m = re.match(r"\| `(\w+)` \|(.*)\|\s*$", line)
        if m and m.group(1) != "placement":  # the header row
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def test_readme_placement_table_matches_the_table() -> None:
    rows = _readme_rows()
    assert set(rows) == set(PLACEMENT_SPECS)
    for name, (equation, used_by, paper) in rows.items():
        spec = PLACEMENT_SPECS[name]
        assert equation == spec.equation, name
        assert used_by == spec.used_by, name
        links = re.findall(r"\((https://arxiv\.org/abs/[\d.]+)\)", paper)
        assert links and set(links) <= set(spec.papers), name


def _reference_sublayer(x: Tensor, f: Any, n_in: Any, n_out: Any, block: Block) -> Tensor:
    """x ← N_C(α·x + N_B(F(s·N_A(x)))) written out from the row (no dropout)."""
    spec = PLACEMENT_SPECS[block.placement]
    h = n_in(x) if n_in is not None else x
    y = f(h * spec.branch_scale(block.layer_idx, L, "decoder"))
    if spec.out_norm_position == "branch" and n_out is not None:
        y = n_out(y)
    s = spec.resid_alpha(block.layer_idx, L, "decoder") * x + y
    return n_out(s) if spec.out_norm_position == "after_add" and n_out is not None else s


@pytest.mark.parametrize("placement", BLOCK_PLACEMENTS)
@pytest.mark.parametrize("layer_idx", [1, 3])
def test_every_block_computes_the_one_equation_of_its_row(placement: str, layer_idx: int) -> None:
    torch.manual_seed(0)
    block = Block(_config(placement), layer_idx, placement, n_tokens=N).double()
    with torch.no_grad():  # distinct affine parameters, so a swapped or skipped norm shows
        for p in block.parameters():
            if p.dim() <= 1:
                p.mul_(0.5 + torch.rand_like(p)).add_(0.2 * torch.randn_like(p))
    x = 3.0 * torch.randn(2, N, D, dtype=torch.float64) + 1.0

    def attn(h: Tensor) -> Tensor:
        return block.attn(h, None, None, True)

    h = _reference_sublayer(x, attn, block.attn_in_norm, block.attn_out_norm, block)
    expected = _reference_sublayer(h, block.mlp, block.mlp_in_norm, block.mlp_out_norm, block)
    torch.testing.assert_close(block(x, is_causal=True), expected)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match=r"'bad': unknown slots \['attn_mid'\]"):
        PlacementSpec("bad", "-", slots=("attn_in", "attn_mid"))
    with pytest.raises(ValueError, match="expected out_norm_position in .* got None with slots"):
        PlacementSpec("bad", "-", slots=("attn_out",))
    with pytest.raises(ValueError, match="expected out_norm_position in .* got 'after_add' with slots"):
        PlacementSpec("bad", "-", slots=("attn_in",), out_norm_position="after_add")
    with pytest.raises(ValueError, match="expected out_norm_position in .* got 'middle'"):
        PlacementSpec("bad", "-", slots=("attn_out",), out_norm_position="middle")
    with pytest.raises(ValueError, match=r"mixes \('post', 'pre'\) has no block fields"):
        PlacementSpec("bad", "-", slots=("attn_in",), mixes=("post", "pre"))
    with pytest.raises(ValueError, match=r"expected placement in \('pre', .*got 'prenorm'"):
        get_placement("prenorm")
    assert set(BLOCK_SLOTS) == {"attn_in", "attn_out", "mlp_in", "mlp_out", "mlp_inner"}


# OLMo 2's "reordered norm" (https://arxiv.org/abs/2501.00656): x ← x + N(F(x)), a branch-output norm and no input
# norm. It is not a built-in placement; this row shows that adding one is a row and nothing else.
REORDERED = PlacementSpec(
    "reordered",
    "x ← x + N(F(x))",
    slots=("attn_out", "mlp_out"),
    out_norm_position="branch",
    used_by="OLMo 2",
    papers=("https://arxiv.org/abs/2501.00656",),
)


def test_a_new_row_is_all_a_placement_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PLACEMENT_SPECS, "reordered", REORDERED)
    cfg = _config("reordered", norm="rms_norm")
    assert cfg.slots_in_use() == ("attn_out", "mlp_out", "final")
    with pytest.raises(ValueError, match=r"slot\(s\) \['attn_in'\] that placement='reordered'"):
        _config("reordered", norm_overrides={"attn_in": "layer_norm"})
    model = DecoderLM(cfg).double()
    block = model.blocks[1]
    assert block.attn_in_norm is None and block.out_norm_position == "branch"
    x = torch.randn(2, N, D, dtype=torch.float64)
    seen: dict[str, Tensor] = {}
    block.attn.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o))
    block.mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o))
    y = block(x, is_causal=True)
    h = x + apply_norm(block.attn_out_norm, seen["attn"], None)
    torch.testing.assert_close(y, h + apply_norm(block.mlp_out_norm, seen["mlp"], None))
    ids = torch.randint(0, 256, (2, N))
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_row_options_are_config_fields() -> None:
    fields = set(TransformerConfig.__dataclass_fields__)
    for spec in PLACEMENT_SPECS.values():
        assert set(spec.options) <= fields, spec.name
    assert PLACEMENT_SPECS["normformer"].options == ("resid_scale",)
    assert PLACEMENT_SPECS["mix"].options == ("mix_post_layers",)
