"""GroupNorm and InstanceNorm specifics: the default group count and the refused inputs."""

from __future__ import annotations

import pytest
import torch

from normlab import GroupNorm, InstanceNorm, LayerNorm


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
