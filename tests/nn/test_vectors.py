"""The specs' test vectors for the foundation norms (../shared/specs/ln-replacements.md §4.10, §5.5, §6.4, §7.3)."""

from __future__ import annotations

import pytest
import torch

from normlab import CRMSNorm, DyT, LayerNorm, PartialRMSNorm, RMSNorm, SRMSNorm

X = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
SMALL = torch.tensor([1e-4, -2e-4, 3e-4, 0.0], dtype=torch.float64)


def _close(got: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(got.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1.5e-7)


def test_rms_norm_eps_placements() -> None:
    out = RMSNorm(4, eps=1e-8, eps_placement="outside", dtype=torch.float64)
    _close(out(X), [0.3651484, 0.7302967, 1.0954451, 1.4605935])
    inside = RMSNorm(4, eps=1e-6, dtype=torch.float64)
    _close(inside(X), [0.3651483, 0.7302967, 1.0954450, 1.4605934])
    _close(out(SMALL), [0.5344939, -1.0689878, 1.6034817, 0.0])
    _close(inside(SMALL), [0.0982946, -0.1965893, 0.2948839, 0.0])


@pytest.mark.parametrize("cls", [RMSNorm, PartialRMSNorm, SRMSNorm])
def test_default_eps_follows_its_placement(cls: type[RMSNorm]) -> None:
    """Default eps: 1e-6 inside the root (LLaMA / torch.nn.RMSNorm), 1e-8 outside (official RMSNorm / fairseq-evo
    code, spec §5.2 and §7.1); an explicit eps wins either way and is what extra_repr and the state report."""
    assert cls(4).eps == 1e-6
    out = cls(4, eps_placement="outside")
    assert out.eps == 1e-8 and "eps=1e-08" in repr(out)
    assert cls(4, eps=1e-5, eps_placement="outside").eps == 1e-5
    assert cls(4, eps=1e-8).eps == 1e-8
    if cls is RMSNorm:  # spec §5.5: the small vector tells the two eps values apart outside the root
        _close(RMSNorm(4, eps_placement="outside", dtype=torch.float64)(SMALL), [0.5344939, -1.0689878, 1.6034817, 0.0])


def test_functional_rms_norm_default_eps_follows_its_placement() -> None:
    from normlab.functional import rms_norm

    expected = RMSNorm(4, eps=1e-8, eps_placement="outside", dtype=torch.float64)(SMALL)
    torch.testing.assert_close(rms_norm(SMALL, 4, eps_inside=False), expected, rtol=0, atol=0)
    expected = RMSNorm(4, eps=1e-6, dtype=torch.float64)(SMALL)
    torch.testing.assert_close(rms_norm(SMALL, 4), expected, rtol=0, atol=0)


def test_prms_norm_partial_and_rounding() -> None:
    m = PartialRMSNorm(4, p=0.5, eps=1e-8, eps_placement="outside", dtype=torch.float64)
    assert m.k == 2
    _close(m(X), [0.6324555, 1.2649111, 1.8973666, 2.5298221])
    assert PartialRMSNorm(64).k == 4  # the paper's p = 6.25%
    assert PartialRMSNorm(10, p=0.25).k == 3 and PartialRMSNorm(10, p=0.25, k_rounding="floor").k == 2
    with pytest.raises(ValueError, match=r"selects k=0 channels; expected at least 1"):
        PartialRMSNorm(8, p=0.0625, k_rounding="floor")
    with pytest.raises(ValueError, match=r"expected p in \(0, 1\], got p=0"):
        PartialRMSNorm(8, p=0.0)
    with pytest.raises(ValueError, match=r"expected rounding in \('ceil', 'floor'\), got 'round'"):
        PartialRMSNorm(8, k_rounding="round")


def test_srms_norm_variants() -> None:
    _close(SRMSNorm(4, dtype=torch.float64)(X), [0.3651483, 0.7302967, 1.0954450, 1.4605934])
    fairseq = SRMSNorm(4, eps=1e-8, eps_placement="outside", dtype=torch.float64)
    _close(fairseq(X), [0.3651484, 0.7302967, 1.0954451, 1.4605935])
    assert len(list(SRMSNorm(4).parameters())) == 0
    with pytest.raises(ValueError, match="expected affine=False, got affine=True"):
        SRMSNorm(4, affine=True)


def test_crms_norm_equals_layer_norm_of_recovered_vector() -> None:
    z = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    _close(CRMSNorm(3, affine=False, dtype=torch.float64)(z), [0.471404, -0.942808, 1.414212])
    full = torch.randn(7, 9, dtype=torch.float64)
    full = full - full.mean(-1, keepdim=True)
    ln = LayerNorm(9, affine=False, dtype=torch.float64)(full)[..., :-1]
    torch.testing.assert_close(CRMSNorm(8, affine=False, dtype=torch.float64)(full[..., :-1]), ln)


def test_dyt_vectors_and_gradients() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    m = DyT(5, dtype=torch.float64)
    y = m(x)
    _close(y, [-0.7615942, -0.2449187, 0.0, 0.4621172, 0.9051483])
    y.sum().backward()
    _close(x.grad, [0.2099872, 0.4700074, 0.5, 0.3932239, 0.0903533])
    assert m.alpha.grad is not None and m.alpha.grad.item() == pytest.approx(0.0186115, abs=1e-7)
    assert m.alpha.shape == (1,)  # one scalar per layer, not per channel (spec §4.8)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([2.0, 1, 1, 1, 0.5]))
        m.bias.copy_(torch.tensor([0.0, 0, 1, 0, -1]))
    _close(m(x), [-1.5231883, -0.2449187, 1.0, 0.4621172, -0.5474259])
