"""What the shared norm base (normlab/nn/_base.py) gives every norm: the extra_repr rule, the mask policy of
per-token norms, the ±inf policy and the channel_dim check."""

from __future__ import annotations

import pytest
import torch

from normlab import CRMSNorm, DyT, LayerNorm, RMSNorm, ScaleNorm, create_norm, list_norms


def test_channel_dim_must_be_an_int() -> None:
    with pytest.raises(TypeError, match="expected channel_dim to be an int, got str"):
        DyT(4, channel_dim="last")  # type: ignore[arg-type]


def test_inf_policy() -> None:
    x = torch.zeros(2, 4)
    x[0, 1] = float("inf")
    y = create_norm("layer_norm", 4)(x)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()  # inf poisons its own token only
    assert DyT(4)(x)[0, 1].item() == pytest.approx(1.0)  # tanh's limit: the documented exception (saturates_inf)


# Norms whose statistics pool over positions with no padding support: a mask would be silently wrong, so it raises.
_REJECT_MASK = {"ada_lin", "batch_channel_norm", "evo_norm_b0", "evo_norm_s0", "filter_response_norm", "group_norm",
                "ibn", "instance_norm", "lin", "online_norm"}


def test_norms_that_pool_over_positions_refuse_a_mask() -> None:
    rejecting = {s.name for s in list_norms() if getattr(s.cls, "rejects_mask", False)}
    assert rejecting == _REJECT_MASK
    x, mask = torch.randn(2, 4, 3, 3), torch.ones(2, 3, 3, dtype=torch.bool)
    for name in sorted(rejecting):
        with pytest.raises(ValueError, match=rf"^{name}: statistics pool over positions.* mask of size \[2, 3, 3\]"):
            create_norm(name, 4)(x, mask=mask)


def test_per_token_norms_ignore_mask() -> None:
    x = torch.randn(2, 3, 4)
    m = LayerNorm(4)
    torch.testing.assert_close(m(x, mask=torch.zeros(2, 3, dtype=torch.bool)), m(x))


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
