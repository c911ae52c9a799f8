"""Weight Normalization: torch's state-dict names, the g = ‖v‖ example, and the data-dependent init against
a float64 computation of the per-unit statistics, layer by layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.testing import reference_weight as ref
from normlab.weight import bake_weights, data_dependent_init_, weight_norm, weight_norm_layers


def test_state_dict_names_and_g_equals_norm_of_v() -> None:
    lin = nn.Linear(2, 1, bias=False)
    lin.weight.data = torch.tensor([[3.0, 4.0]])
    weight_norm(lin)
    sd = lin.state_dict()
    assert set(sd) == {"parametrizations.weight.original0", "parametrizations.weight.original1"}
    assert sd["parametrizations.weight.original0"].item() == 5.0  # g = ‖v‖ at wrap time
    torch.testing.assert_close(lin.weight, torch.tensor([[3.0, 4.0]]))
    plain = nn.utils.parametrizations.weight_norm(nn.Linear(2, 1, bias=False))
    plain.load_state_dict(sd)  # interchangeable with PyTorch's own parametrization
    torch.testing.assert_close(plain.weight, lin.weight)


def test_ddi_standardizes_a_linear_layer_against_float64_stats() -> None:
    lin = weight_norm(nn.Linear(5, 3))
    x = torch.randn(64, 5) * 3 + 1
    g = torch.Generator().manual_seed(1)
    assert data_dependent_init_(lin, x, generator=g) == [""]
    plist = lin.parametrizations.weight
    v = plist.original1.detach().double()
    assert v.std().item() == pytest.approx(0.05, rel=0.35)  # fresh v ~ N(0, 0.05²)
    t = x.double() @ (v / v.norm(dim=1, keepdim=True)).t()  # paper: t = v·x / ‖v‖
    means, stds = ref.standardize_linear_outputs(t)
    exp_g = torch.tensor([[1 / s] for s in stds], dtype=torch.float64)
    exp_b = torch.tensor([-m / s for m, s in zip(means, stds)], dtype=torch.float64)
    torch.testing.assert_close(plist.original0.double(), exp_g, rtol=1e-5, atol=0)
    torch.testing.assert_close(lin.bias.double(), exp_b, rtol=1e-5, atol=1e-6)
    y = lin(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(3), rtol=1e-4, atol=0)


def test_ddi_conv_reduces_over_batch_and_space_and_keeps_v_with_v_std_none() -> None:
    conv = weight_norm(nn.Conv2d(3, 4, 3))
    v_before = conv.parametrizations.weight.original1.detach().clone()
    x = torch.randn(6, 3, 9, 9) + 0.5
    data_dependent_init_(conv, x, v_std=None)
    assert torch.equal(conv.parametrizations.weight.original1, v_before)
    assert conv.parametrizations.weight.original0.shape == (4, 1, 1, 1)
    y = conv(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(4), rtol=1e-4, atol=0)


def test_ddi_is_layer_by_layer_in_forward_order() -> None:
    # The second layer is initialised on the *standardized* output of the first: both end up standardized.
    net = nn.Sequential(weight_norm(nn.Linear(4, 8)), nn.ReLU(), weight_norm(nn.Linear(8, 3)))
    x = torch.randn(128, 4) * 5
    assert data_dependent_init_(net, x) == ["0", "2"]
    h = net[0](x)
    torch.testing.assert_close(h.std(0, unbiased=False), torch.ones(8), rtol=1e-4, atol=0)
    out = net(x)
    torch.testing.assert_close(out.mean(0), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.ones(3), rtol=1e-4, atol=0)
    assert weight_norm_layers(net).keys() == {"0", "2"}


def test_ddi_layer_without_bias_only_scales_g() -> None:
    lin = weight_norm(nn.Linear(4, 2, bias=False))
    x = torch.randn(50, 4)
    data_dependent_init_(lin, x)
    torch.testing.assert_close(lin(x).std(0, unbiased=False), torch.ones(2), rtol=1e-4, atol=0)


def test_bake_weights_removes_weight_norm() -> None:
    lin = weight_norm(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    expected = lin(x)
    assert bake_weights(lin) == ["weight"]
    assert type(lin) is nn.Linear and set(lin.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(lin(x), expected)


def test_errors() -> None:
    with pytest.raises(ValueError, match="no nn.Linear/nn.ConvNd with a weight_norm parametrization"):
        data_dependent_init_(nn.Linear(2, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="uses weight_norm dim=1; the init needs dim=0"):
        data_dependent_init_(weight_norm(nn.Linear(2, 2), dim=1), torch.randn(3, 2))

    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = weight_norm(nn.Linear(2, 2)), weight_norm(nn.Linear(2, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    with pytest.raises(ValueError, match=r"never called \['b'\].*initialised: \['a'\]"):
        data_dependent_init_(Skips(), torch.randn(5, 2))
    with pytest.raises(ValueError, match="v_std to be a number > 0 or None, got 0"):
        data_dependent_init_(weight_norm(nn.Linear(2, 2)), torch.randn(3, 2), v_std=0)
    with pytest.raises(ValueError, match=r"dim None or in \[-2, 2\) .* got 2"):
        weight_norm(nn.Linear(2, 2), dim=2)
