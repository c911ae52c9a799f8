"""The RN inpainting generator: shapes, the mask reaching RN-B resized to each feature map (and no other norm),
every norm choice building and training a step, gradients to every parameter, the holes never leaking, and the
config's and input's validation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from normlab.models.inpainting import (
    InpaintingConfig,
    InpaintingGenerator,
    InpaintingOutput,
    masked_input,
    takes_hole_mask,
)
from normlab.nn.region_norm import RegionNorm

CHOICES: dict[str, dict[str, Any]] = {
    "rn": {},  # RN-B encoder, RN-L later: the paper's
    "rn_b_only": {"later_norm": None},
    "rn_instance_stats": {"norm_kwargs": {"statistics": "instance"},
                          "later_norm_kwargs": {"learnable": True, "statistics": "instance"}},
    "instance_norm": {"norm": "instance_norm", "later_norm": None},
    "batch_norm": {"norm": "batch_norm", "later_norm": None},
    "group_norm": {"norm": "group_norm", "norm_kwargs": {"num_groups": 2}, "later_norm": None},
    "rn_b_then_in": {"later_norm": "instance_norm", "later_norm_kwargs": {}},
}


def _batch(n: int = 3, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    image = torch.rand(n, 3, size, size)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 3:9, 5:12] = 1.0
    mask[0, :, 10:14, 1:4] = 1.0
    return image, mask


def _model(**kw: Any) -> InpaintingGenerator:
    torch.manual_seed(0)
    return InpaintingGenerator(InpaintingConfig(width=4, n_blocks=2, **kw))


def test_shapes_output_range_and_hidden_states() -> None:
    image, mask = _batch(size=24)
    out = _model()(image, mask, target=image, output_hidden_states=True)
    assert isinstance(out, InpaintingOutput)
    assert out.image.shape == image.shape and out.loss is not None and out.loss.dim() == 0
    assert bool(((out.image > 0) & (out.image < 1)).all())
    assert out.hidden_states is not None
    assert [tuple(h.shape) for h in out.hidden_states] == [(3, 16, 6, 6)] * 3  # encoder + 2 blocks at 4w, S/4
    assert _model()(image, mask).loss is None


def test_layer_plan_matches_the_paper() -> None:
    g = _model()
    assert [type(m.norm) for m in g.enc_norms] == [RegionNorm] * 3
    assert all(not m.norm.learnable for m in g.enc_norms)  # RN-B in the encoder
    later = [b.norm1.norm for b in g.blocks] + [b.norm2.norm for b in g.blocks] + [m.norm for m in g.dec_norms]
    assert len(later) == 6 and all(isinstance(n, RegionNorm) and n.learnable for n in later)  # RN-L after
    assert [c.stride for c in g.enc_convs] == [(1, 1), (2, 2), (2, 2)]
    assert [b.conv1.dilation for b in g.blocks] == [(2, 2), (2, 2)]
    assert [m.norm.num_features for m in g.enc_norms] == [4, 8, 16]
    assert [m.norm.num_features for m in g.dec_norms] == [8, 4]


def _seen_masks(g: InpaintingGenerator, image: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen[name] = (kwargs.get("mask"), tuple(args[0].shape))
        return record

    for name, module in g.named_modules():
        if name.endswith(".norm"):
            module.register_forward_pre_hook(hook(name), with_kwargs=True)
    g(image, mask)
    return seen


def test_rn_b_gets_the_mask_resized_by_nearest_neighbour() -> None:
    image, mask = _batch(size=16)
    g = _model(later_norm=None)  # RN-B everywhere: every norm gets the mask
    seen = _seen_masks(g, image, mask)
    assert len(seen) == 3 + 4 + 2
    for name, (m, shape) in seen.items():
        assert m is not None, name
        assert tuple(m.shape) == (shape[0], 1, *shape[2:]), name  # the feature map's size
        expected = torch.nn.functional.interpolate(mask, size=shape[2:], mode="nearest")
        assert torch.equal(m, expected), name
    assert torch.equal(seen["enc_norms.0.norm"][0], mask)  # full resolution at the first layer


def test_only_rn_b_gets_the_mask() -> None:
    image, mask = _batch()
    seen = _seen_masks(_model(), image, mask)  # RN-L later: no mask there
    assert {n for n, (m, _) in seen.items() if m is not None} == {f"enc_norms.{i}.norm" for i in range(3)}
    seen = _seen_masks(_model(norm="batch_norm", later_norm=None), image, mask)  # BN's mask is a padding mask
    assert all(m is None for m, _ in seen.values())
    assert takes_hole_mask(RegionNorm(4)) and not takes_hole_mask(RegionNorm(4, learnable=True))
    assert not takes_hole_mask(nn.BatchNorm2d(4))


def test_the_hole_is_never_seen() -> None:
    image, mask = _batch()
    other = image.clone()
    other[mask.expand_as(image).bool()] = torch.rand(int(mask.expand_as(image).sum()))
    g = _model()
    assert torch.equal(g(image, mask).image, g(other, mask).image)
    x = masked_input(image, mask)
    assert x.shape == (3, 4, 16, 16) and torch.equal(x[:, 3:], mask)
    assert bool((x[:, :3][mask.expand_as(image).bool()] == 1).all())  # holes filled with 1 (official)


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_every_norm_choice_builds_and_trains_a_step(name: str) -> None:
    image, mask = _batch(n=4)
    g = _model(**CHOICES[name])
    opt = torch.optim.Adam(g.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        loss = g(image, mask, target=image).loss
        assert loss is not None and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    g.eval()
    with torch.no_grad():
        assert torch.isfinite(g(image, mask).image).all()


@pytest.mark.parametrize("name", ["rn", "instance_norm"])
def test_gradient_reaches_every_parameter(name: str) -> None:
    image, mask = _batch()
    g = _model(**CHOICES[name])
    # RN's affine parameters start at 0 (the identity): one step moves them off so every gradient path is open
    opt = torch.optim.SGD(g.parameters(), lr=1e-1)
    for _ in range(2):
        opt.zero_grad()
        g(image, mask, target=image).loss.backward()  # type: ignore[union-attr]
        missing = [n for n, p in g.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert missing == []
        opt.step()
    dead = [n for n, p in g.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) == 0.0]
    assert dead == []


def test_loss_is_l1_over_the_mean_mask() -> None:
    image, mask = _batch()
    out = _model()(image, mask, target=image)
    expected = (out.image - image).abs().mean() / mask.mean()
    assert torch.allclose(out.loss, expected)  # type: ignore[arg-type]


def test_config_round_trip_and_defaults() -> None:
    c = InpaintingConfig()
    assert (c.norm, c.later_norm, c.later_norm_kwargs, c.width, c.n_blocks) == (
        "region_norm", "region_norm", {"learnable": True}, 16, 2)
    assert InpaintingConfig.from_dict(c.to_dict()) == c
    assert InpaintingConfig(norm="batch_norm", later_norm=None).later() == ("batch_norm", {})


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"width": 0}, ValueError, r"width to be an int >= 1, got 0"),
    ({"n_blocks": -1}, ValueError, r"n_blocks to be an int >= 0, got -1"),
    ({"norm": "nope"}, (ValueError, KeyError), r"nope"),
    ({"norm": 3}, TypeError, r"expected norm to be a registry key \(str\), got int"),
    ({"later_norm": 3}, TypeError, r"expected norm to be a registry key \(str\) or None, got int"),
    ({"norm_kwargs": [1]}, TypeError, r"norm_kwargs to be a dict, got list"),
])
def test_bad_config(kw: dict[str, Any], error: Any, match: str) -> None:
    with pytest.raises(error, match=match):
        InpaintingConfig(**kw)


def test_bad_input() -> None:
    g = _model()
    image, mask = _batch()
    with pytest.raises(TypeError, match=r"expected an InpaintingConfig, got dict"):
        InpaintingGenerator({})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected image of shape \[B, 3, H, W\], got \[3, 1, 16, 16\]"):
        g(image[:, :1], mask)
    with pytest.raises(ValueError, match=r"H and W multiples of 4 and >= 8, got image of shape \[3, 3, 14, 16\]"):
        g(image[:, :, :14], mask[:, :, :14])
    with pytest.raises(ValueError, match=r"expected mask of shape \[B, 1, H, W\] = \[3, 1, 16, 16\], got \[2, 1, "):
        g(image, mask[:2])
    with pytest.raises(TypeError, match=r"expected mask to be a torch.Tensor, got list"):
        g(image, [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected target of shape \[3, 3, 16, 16\]"):
        g(image, mask, target=image[:1])
    assert g(image, mask[:, 0]).image.shape == image.shape  # (B, H, W) masks are accepted
