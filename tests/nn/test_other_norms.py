"""Group/Instance/Layer/Scale norm specifics and input-policy tests the contract suite cannot express."""

from __future__ import annotations

import pytest
import torch

from normlab import CRMSNorm, DyT, GroupNorm, InstanceNorm, LayerNorm, RMSNorm, ScaleNorm, create_norm


def test_group_norm_groups() -> None:
    assert GroupNorm(64).num_groups == 32 and GroupNorm(48).num_groups == 24 and GroupNorm(7).num_groups == 7
    with pytest.raises(
        ValueError, match=r"expected num_groups to be a positive divisor of num_channels=6, got num_groups=4"
    ):
        GroupNorm(6, num_groups=4)
    x = torch.randn(2, 6, 5)
    torch.testing.assert_close(GroupNorm(6, num_groups=1, affine=False)(x), LayerNorm((6, 5), affine=False)(x))


def test_masks_refused_where_statistics_pool_positions() -> None:
    with pytest.raises(ValueError, match="padding masks are not supported; expected mask=None"):
        GroupNorm(4, channel_dim=-1)(torch.randn(2, 3, 4), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected more than 1 spatial element per channel"):
        InstanceNorm(4)(torch.randn(2, 4, 1))


def test_per_token_norms_ignore_mask() -> None:
    x = torch.randn(2, 3, 4)
    m = LayerNorm(4)
    torch.testing.assert_close(m(x, mask=torch.zeros(2, 3, dtype=torch.bool)), m(x))


def test_layer_norm_channel_first_and_bias_switch() -> None:
    x = torch.randn(2, 6, 3, 3)
    ln2d = LayerNorm(6, channel_dim=1)
    torch.testing.assert_close(ln2d(x), LayerNorm(6)(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    assert LayerNorm(6, bias=False).bias is None
    assert "channel_dim=1" in repr(ln2d)
    with pytest.raises(ValueError, match=r"expected normalized_shape of positive ints, got 0"):
        LayerNorm(0)
    with pytest.raises(ValueError, match=r"a multi-dim normalized_shape=\[2, 3\] needs channel_dim=-1, got 1"):
        LayerNorm((2, 3), channel_dim=1)


def test_eps_placement_validated_and_torch_names_accepted() -> None:
    with pytest.raises(ValueError, match=r"expected eps_placement in \('inside', 'outside'\), got 'middle'"):
        RMSNorm(4, eps_placement="middle")  # type: ignore[arg-type]
    assert LayerNorm(4, elementwise_affine=False).weight is None
    with pytest.raises(TypeError, match="expected channel_dim to be an int, got str"):
        DyT(4, channel_dim="last")  # type: ignore[arg-type]


def test_scale_norm_init_and_inf_policy() -> None:
    assert ScaleNorm(16).weight.item() == pytest.approx(4.0)
    x = torch.zeros(2, 4)
    x[0, 1] = float("inf")
    y = create_norm("layer_norm", 4)(x)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()  # inf poisons its own token only
    assert DyT(4)(x)[0, 1].item() == pytest.approx(1.0)  # tanh's limit: the documented exception


@pytest.mark.parametrize("kwargs", [{}, {"eps": None}, {"eps": 1e-3}])
def test_rms_norm_torch_twin_uses_our_eps(kwargs: dict) -> None:
    """The torch twin of RMSNorm gets our resolved eps, not torch's ``eps=None`` (finfo.eps)."""
    ours = RMSNorm(16, **kwargs)
    twin = RMSNorm.torch_twin(16, **kwargs)
    assert twin is not None and twin.eps == ours.eps
    x = torch.randn(3, 16, dtype=torch.float64) * 1e-4  # small enough that eps matters
    torch.testing.assert_close(twin.double()(x), ours.double()(x))


def test_scale_norm_loads_a_state_dict_saved_before_the_rename_to_weight() -> None:
    """``_version`` 1 called g ``scale``; the load hook maps it to ``weight`` (old checkpoints keep loading)."""
    from collections import OrderedDict

    old: OrderedDict[str, torch.Tensor] = OrderedDict([("norm.scale", torch.tensor([2.5]))])
    old._metadata = OrderedDict([("", {"version": 1}), ("norm", {"version": 1})])  # type: ignore[attr-defined]
    net = torch.nn.Sequential()
    net.add_module("norm", ScaleNorm(4))
    net.load_state_dict(old, strict=True)
    assert net.norm.weight.item() == 2.5 and not hasattr(net.norm, "scale")
    bare = ScaleNorm(4)
    bare.load_state_dict({"scale": torch.tensor([0.5])})  # no metadata at all: a hand-built old dict
    assert bare.weight.item() == 0.5
    assert list(ScaleNorm(4).state_dict()) == ["weight"] and ScaleNorm(4).state_dict()._metadata[""]["version"] == 2


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (CRMSNorm(4, channel_dim=1), "4, channel_dim=1"),
        (CRMSNorm(4, affine=False, bias=True, eps=1e-6), "4, eps=1e-06, affine=False, bias=True"),
        (LayerNorm(4, bias=False), "4, bias=False"),
        (LayerNorm((2, 3)), "(2, 3)"),
        (RMSNorm(4), "4, eps=1e-06"),
        (ScaleNorm(4, eps=1e-3), "4, eps=0.001"),
        (DyT(4, alpha_init=0.8, channel_dim=1), "4, alpha_init=0.8, channel_dim=1"),
    ],
)
def test_extra_repr_lists_every_constructor_argument_that_differs_from_its_default(
    module: torch.nn.Module, expected: str
) -> None:
    assert module.extra_repr() == expected
