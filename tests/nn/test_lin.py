"""LIN / AdaLIN (U-GAT-IT, https://arxiv.org/abs/1907.10830): the spec's vectors for the official PyTorch and TF
variants, ρ initialisation and clipping, external γ/β."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.nn import LIN, AdaLIN
from normlab.nn.lin import clip_rho_, register_rho_clipper
from normlab.testing.reference_lin import ada_lin as ada_lin_reference

F64 = torch.float64
X = torch.tensor([[[[1.0, 3.0]], [[5.0, 7.0]]]], dtype=F64)  # N=1, C=2, H=1, W=2
UNBIASED = [-0.7526, 0.5977, -0.5977, 0.7526]
BIASED = [-1.0342, 0.8553, -0.8553, 1.0342]


def _close(got: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(got.detach().flatten(), torch.tensor(expected, dtype=F64), rtol=0, atol=1e-4)


def test_spec_vectors_pytorch_and_tf() -> None:
    _close(AdaLIN(2, dtype=F64)(X), UNBIASED)  # ρ init 0.9
    _close(AdaLIN(2, variant="tf", dtype=F64)(X), BIASED)  # ρ init 1, used as clip(ρ − 0.1) = 0.9
    _close(LIN(2, rho_init=0.9, dtype=F64)(X), UNBIASED)
    _close(LIN(2, rho_init=0.9, variant="tf", dtype=F64)(X), BIASED)
    # The pure halves: ρ = 1 is IN, ρ = 0 LN.
    _close(LIN(2, rho_init=1.0, dtype=F64)(X), [-0.7071, 0.7071, -0.7071, 0.7071])
    _close(LIN(2, dtype=F64)(X), [-1.1619, -0.3873, 0.3873, 1.1619])
    _close(LIN(2, variant="tf", dtype=F64)(X), [-1.3416, -0.4472, 0.4472, 1.3416])


def test_official_rho_initialisation() -> None:
    assert LIN(3).rho.tolist() == [0.0] * 3 and LIN(3, variant="tf").rho.tolist() == [0.0] * 3
    assert torch.allclose(AdaLIN(3).rho, torch.full((3,), 0.9)) and AdaLIN(3, variant="tf").rho.tolist() == [1.0] * 3


@pytest.mark.parametrize("cls", [LIN, AdaLIN])
@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_initial_rho_outside_the_unit_interval_is_refused(cls: type[nn.Module], bad: float) -> None:
    with pytest.raises(ValueError, match=rf"expected rho_init in \[0, 1\], got {bad}"):
        cls(4, rho_init=bad)
    with pytest.raises(ValueError, match=r"expected variant in \('pytorch', 'tf'\), got 'keras'"):
        cls(4, variant="keras")


def test_clipper_after_each_optimizer_step() -> None:
    net = nn.Sequential(nn.Conv2d(2, 4, 1), LIN(4), nn.Conv2d(4, 4, 1), AdaLIN(4))
    with torch.no_grad():
        net[1].rho.copy_(torch.tensor([-0.5, 0.2, 1.7, 0.9]))
    assert clip_rho_(net) == 2
    assert net[1].rho.tolist() == pytest.approx([0.0, 0.2, 1.0, 0.9])
    opt = torch.optim.SGD(net.parameters(), lr=100.0)
    stop = register_rho_clipper(opt, net)
    for _ in range(2):
        net(torch.randn(2, 2, 5, 5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        for m in (net[1], net[3]):
            assert m.rho.min() >= 0.0 and m.rho.max() <= 1.0
    stop()
    with torch.no_grad():
        net[3].rho.fill_(2.0)
    opt.step()
    assert net[3].rho.max() == 2.0  # no clipping once removed


def test_ada_lin_takes_per_sample_gamma_and_beta() -> None:
    m = AdaLIN(3, dtype=F64)
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    gamma, beta = torch.rand(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    y = m(x, gamma=gamma, beta=beta)
    torch.testing.assert_close(y, ada_lin_reference(m, x, gamma=gamma, beta=beta))
    torch.testing.assert_close(y[1:2], m(x[1:2], gamma=gamma[1:2], beta=beta[1:2]))  # per sample
    shared = m(x, gamma=gamma[0], beta=beta[0])
    torch.testing.assert_close(shared, ada_lin_reference(m, x, gamma=gamma[0].expand(4, 3), beta=beta[0].expand(4, 3)))
    with pytest.raises(ValueError, match=r"expected gamma of size \[4, 3\] \(one per sample\) or \[3\], got gamma of "
                                         r"size \[2, 3\]"):
        m(x, gamma=gamma[:2])
    gamma.requires_grad_(True)
    m(x, gamma=gamma, beta=beta).sum().backward()
    assert gamma.grad is not None and m.rho.grad is not None


def test_unbiased_variances_need_two_positions() -> None:
    x = torch.randn(2, 3, 1, 1)
    with pytest.raises(ValueError, match=r"unbiased variances .* need more than 1 position per channel, got input of "
                                         r"size \[2, 3, 1, 1\]; variant='tf'"):
        LIN(3)(x)
    assert torch.isfinite(LIN(3, variant="tf")(x)).all()
