"""LayerNorm specifics: channel-first inputs, the bias switch and torch's argument names."""

from __future__ import annotations

import pytest
import torch

from normlab import LayerNorm


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


def test_torch_argument_name_accepted() -> None:
    assert LayerNorm(4, elementwise_affine=False).weight is None
