"""FRN + TLU (https://arxiv.org/abs/1911.09737): a hand-checked vector, no centring, scale invariance, the TLU."""

from __future__ import annotations

import torch

from normlab.nn import FilterResponseNorm

F64 = torch.float64


def test_hand_checked_vector_and_tlu() -> None:
    x = torch.tensor([[[[3.0, -4.0]]]], dtype=F64)  # nu^2 = (9 + 16) / 2 = 12.5
    y = FilterResponseNorm(1, tlu=False, eps=0.0, dtype=F64)(x)
    torch.testing.assert_close(y.detach().flatten(), torch.tensor([3.0, -4.0], dtype=F64) / 12.5**0.5)
    m = FilterResponseNorm(1, eps=0.0, dtype=F64)
    with torch.no_grad():
        m.tau.fill_(-0.5)  # type: ignore[union-attr]
    torch.testing.assert_close(m(x).detach().flatten(), torch.tensor([3 / 12.5**0.5, -0.5], dtype=F64))
    m(x).sum().backward()
    assert m.tau.grad is not None and m.tau.grad.item() == 1.0  # type: ignore[union-attr]


def test_per_sample_scale_invariance_without_centring() -> None:
    m = FilterResponseNorm(4, tlu=False, eps=0.0, dtype=F64)
    x = torch.randn(3, 4, 5, 5, dtype=F64) + 2.0
    scale = torch.tensor([0.5, 2.0, 10.0], dtype=F64).reshape(3, 1, 1, 1)
    torch.testing.assert_close(m(x * scale), m(x))
    assert (m(x).mean((2, 3)) > 0.5).all()  # a positive mean is kept: FRN does not centre


def test_fully_connected_input_normalises_each_value_by_itself() -> None:
    m = FilterResponseNorm(3, tlu=False, eps=1e-6)
    x = torch.tensor([[2.0, -3.0, 0.5]])
    torch.testing.assert_close(m(x), x / torch.sqrt(x**2 + 1e-6))
