"""BatchNorm specifics the contract suite cannot express: masks, running-stat updates, bad input."""

from __future__ import annotations

import pytest
import torch

from normlab import BatchNorm


def test_masked_statistics_ignore_padding_content() -> None:
    bn = BatchNorm(4, channel_dim=-1)
    x = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    y1 = bn(x, mask=mask)
    x2 = x.clone()
    x2[~mask] = 1e6
    y2 = BatchNorm(4, channel_dim=-1)(x2, mask=mask)
    torch.testing.assert_close(y1[mask], y2[mask])
    valid = x[mask]
    torch.testing.assert_close(bn.running_mean, 0.1 * valid.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * valid.var(0, unbiased=True))
    assert bn.num_batches_tracked.item() == 1


def test_cumulative_average_with_momentum_none() -> None:
    bn = BatchNorm(3, momentum=None)
    xs = [torch.randn(4, 3, 2, 2) for _ in range(3)]
    for x in xs:
        bn(x)
    means = torch.stack([x.transpose(0, 1).reshape(3, -1).mean(1) for x in xs])
    torch.testing.assert_close(bn.running_mean, means.mean(0))


def test_token_and_channel_first_layouts_agree() -> None:
    x = torch.randn(3, 5, 4)
    tok = BatchNorm(4, channel_dim=-1)
    ch = BatchNorm(4, channel_dim=1)
    torch.testing.assert_close(tok(x), ch(x.transpose(1, 2)).transpose(1, 2))


def test_one_value_per_channel_in_training_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"expected more than 1 value per channel when training, got input of size \[1, 4\]"
    ):
        BatchNorm(4)(torch.randn(1, 4))
    assert BatchNorm(4).eval()(torch.randn(1, 4)).shape == (1, 4)


def test_mask_that_masks_every_token_is_refused() -> None:
    mask = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"expected more than 1 valid \(unmasked\) value per channel.*got 0 valid"):
        BatchNorm(4, channel_dim=-1)(torch.randn(2, 3, 4), mask=mask)


def test_bad_masks_and_arguments() -> None:
    bn = BatchNorm(4, channel_dim=-1)
    with pytest.raises(ValueError, match=r"expected mask of size \[2, 3\].*got mask of size \[2, 4\]"):
        bn(torch.randn(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"expected a bool or integer mask.*got dtype torch.float32"):
        bn(torch.randn(2, 3, 4), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"expected momentum in \[0, 1\] or None, got 2"):
        BatchNorm(4, momentum=2)
    with pytest.raises(ValueError, match=r"expected num_features to be an int >= 1, got 0"):
        BatchNorm(0)
    with pytest.raises(ValueError, match=r"channel_dim=5 is out of range for an input of size \[2, 3, 4\]"):
        BatchNorm(4, channel_dim=5)(torch.randn(2, 3, 4))


def test_fold_affine_matches_eval_output() -> None:
    bn = BatchNorm(4, channel_dim=-1)
    for _ in range(3):
        bn(torch.randn(8, 5, 4) * 2 + 1)
    bn.eval()
    fa = bn.folded_affine()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(bn.double()(x), x * fa.scale + fa.shift)
    with pytest.raises(RuntimeError, match="needs eval mode"):
        bn.train().folded_affine()


@pytest.mark.parametrize("channel_dim", [1, -1])
def test_no_running_stats_with_momentum_none_matches_torch(channel_dim: int) -> None:
    """momentum=None only matters for running stats; without them torch accepts it and so must we."""
    ours = BatchNorm(4, track_running_stats=False, momentum=None, channel_dim=channel_dim)
    theirs = torch.nn.BatchNorm1d(4, track_running_stats=False, momentum=None)
    x = torch.randn(3, 4, 5)
    for mode in (True, False):
        ours.train(mode), theirs.train(mode)
        got = ours(x if channel_dim == 1 else x.transpose(1, 2))
        torch.testing.assert_close(got if channel_dim == 1 else got.transpose(1, 2), theirs(x))


def test_cumulative_average_without_a_step_counter_is_refused() -> None:
    from normlab.functional import batch_norm

    x = torch.randn(3, 4, 5)
    for mask in (None, torch.ones(3, 5, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"momentum=None \(cumulative average\) needs num_batches_tracked"):
            batch_norm(
                x.transpose(1, 2) if mask is not None else x, 4, torch.zeros(4), torch.ones(4), training=True,
                momentum=None, channel_dim=-1 if mask is not None else 1, mask=mask,
            )
