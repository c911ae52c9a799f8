"""Tests of normlab/nn/sigma_reparam.py: σReparam linear (spectral norm by power iteration, γ init, train/eval)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.nn.sigma_reparam import SigmaReparamLinear, spectral_norm_estimate


def test_starts_as_the_plain_linear_with_gamma_sigma() -> None:
    lin = SigmaReparamLinear(10, 6).double()
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    exact = torch.linalg.matrix_norm(lin.weight.detach(), ord=2)
    torch.testing.assert_close(lin.gamma.detach(), exact)
    torch.testing.assert_close(lin.sigma, exact)


def test_gamma_one_gives_unit_spectral_norm() -> None:
    lin = SigmaReparamLinear(12, 7, gamma_init="one").double()
    w_eff = lin.effective_weight().detach()
    torch.testing.assert_close(torch.linalg.matrix_norm(w_eff, ord=2), torch.tensor(1.0, dtype=torch.float64))


def test_power_iteration_converges_to_the_spectral_norm() -> None:
    lin = SigmaReparamLinear(10, 6, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 10, dtype=torch.float64))  # u is now stale
    exact = torch.linalg.matrix_norm(lin.weight.detach(), ord=2)
    x = torch.randn(3, 10, dtype=torch.float64)
    lin.train()
    lin(x)
    first = lin.sigma.clone()
    for _ in range(300):
        lin(x)
    assert not torch.allclose(first, exact, rtol=1e-6)  # one step from a stale u is not yet converged
    torch.testing.assert_close(lin.sigma, exact, rtol=1e-8, atol=0)


def test_estimate_is_differentiable_in_weight_only_through_the_bilinear_form() -> None:
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    u = F.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    sigma, u_new, v = spectral_norm_estimate(w, u)
    sigma.backward()
    assert w.grad is not None
    torch.testing.assert_close(w.grad, torch.outer(v, u_new))  # d(vᵀ W u)/dW with u, v constants
    assert not u_new.requires_grad and not v.requires_grad


def test_eval_does_not_update_buffers_and_train_does() -> None:
    lin = SigmaReparamLinear(8, 8)
    with torch.no_grad():
        lin.weight.add_(0.5 * torch.randn(8, 8))
    u0 = lin.u.clone()
    lin.eval()
    lin(torch.randn(2, 8))
    torch.testing.assert_close(lin.u, u0, rtol=0, atol=0)
    lin.train()
    lin(torch.randn(2, 8))
    assert not torch.equal(lin.u, u0)


def test_gradients_reach_weight_gamma_and_bias() -> None:
    lin = SigmaReparamLinear(6, 3)
    lin(torch.randn(4, 6)).square().sum().backward()
    for p in (lin.weight, lin.gamma, lin.bias):
        assert p is not None and p.grad is not None and torch.isfinite(p.grad).all()


def test_state_dict_and_not_an_nn_linear() -> None:
    lin = SigmaReparamLinear(6, 3)
    assert set(lin.state_dict()) == {"weight", "bias", "gamma", "u", "sigma"}
    assert not isinstance(lin, nn.Linear)  # folding code must not mistake weight for the effective weight
    other = SigmaReparamLinear(6, 3)
    other.load_state_dict(lin.state_dict())
    x = torch.randn(2, 6)
    torch.testing.assert_close(other.eval()(x), lin.eval()(x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_features": 0, "out_features": 3}, "expected in_features to be an int >= 1, got 0"),
        ({"in_features": 3, "out_features": 3, "gamma_init": "zero"}, "gamma_init 'sigma' or 'one', got 'zero'"),
        ({"in_features": 3, "out_features": 3, "n_power_iterations": 0}, "expected n_power_iterations >= 1, got 0"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SigmaReparamLinear(**kwargs)
