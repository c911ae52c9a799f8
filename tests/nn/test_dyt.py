"""DyT: a hand-derived vector with its gradients (input, α) and the affine."""

from __future__ import annotations

import pytest
import torch

from normlab import DyT


def _close(got: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(got.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1.5e-7)


def test_dyt_vectors_and_gradients() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    m = DyT(5, dtype=torch.float64)
    y = m(x)
    _close(y, [-0.7615942, -0.2449187, 0.0, 0.4621172, 0.9051483])
    y.sum().backward()
    _close(x.grad, [0.2099872, 0.4700074, 0.5, 0.3932239, 0.0903533])
    assert m.alpha.grad is not None and m.alpha.grad.item() == pytest.approx(0.0186115, abs=1e-7)
    assert m.alpha.shape == (1,)  # one scalar per layer, not per channel (as in the DyT paper)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([2.0, 1, 1, 1, 0.5]))
        m.bias.copy_(torch.tensor([0.0, 0, 1, 0, -1]))
    _close(m(x), [-1.5231883, -0.2449187, 1.0, 0.4621172, -0.5474259])
