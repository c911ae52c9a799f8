"""RMS-family norms (RMSNorm, pRMSNorm, SRMSNorm, CRMSNorm, ScaleNorm): hand-derived vectors, eps placement, partial
sizes, the torch twin's eps and ScaleNorm's old checkpoints; the generic contract is tests/test_contract.py."""

from __future__ import annotations

import pytest
import torch

from normlab import CRMSNorm, LayerNorm, PartialRMSNorm, RMSNorm, ScaleNorm, SRMSNorm

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
    code of RMSNorm and TransNormer); an explicit eps wins either way and is what extra_repr and the state report."""
    assert cls(4).eps == 1e-6
    out = cls(4, eps_placement="outside")
    assert out.eps == 1e-8 and "eps=1e-08" in repr(out)
    assert cls(4, eps=1e-5, eps_placement="outside").eps == 1e-5
    assert cls(4, eps=1e-8).eps == 1e-8
    if cls is RMSNorm:  # the small vector tells the two eps values apart outside the root
        _close(RMSNorm(4, eps_placement="outside", dtype=torch.float64)(SMALL), [0.5344939, -1.0689878, 1.6034817, 0.0])


def test_functional_rms_norm_default_eps_follows_its_placement() -> None:
    from normlab.functional import rms_norm

    # The composite module: bit-identical to the functional op it calls (the fused kernel rounds differently).
    expected = RMSNorm(4, eps=1e-8, eps_placement="outside", dtype=torch.float64, impl="composite")(SMALL)
    torch.testing.assert_close(rms_norm(SMALL, 4, eps_inside=False), expected, rtol=0, atol=0)
    expected = RMSNorm(4, eps=1e-6, dtype=torch.float64, impl="composite")(SMALL)
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


def test_eps_placement_validated() -> None:
    with pytest.raises(ValueError, match=r"expected eps_placement in \('inside', 'outside'\), got 'middle'"):
        RMSNorm(4, eps_placement="middle")  # type: ignore[arg-type]


def test_scale_norm_init() -> None:
    assert ScaleNorm(16).weight.item() == pytest.approx(4.0)  # g = sqrt(C)


@pytest.mark.parametrize("kwargs", [{}, {"eps": None}, {"eps": 1e-3}])
def test_rms_norm_torch_twin_uses_our_eps(kwargs: dict) -> None:
    """The torch twin of RMSNorm gets our resolved eps, not torch's ``eps=None`` (finfo.eps)."""
    ours = RMSNorm(16, **kwargs)
    twin = RMSNorm.torch_twin(16, **kwargs)
    assert twin is not None and twin.eps == ours.eps
    x = torch.randn(3, 16, dtype=torch.float64) * 1e-4  # small enough that eps matters
    torch.testing.assert_close(twin.double()(x), ours.double()(x))


def test_scale_norm_loads_a_state_dict_saved_before_the_rename_to_weight() -> None:
    """``_version`` 1 called g ``scale``; the load hook maps it to ``weight`` (old checkpoints keep loading)."""
    from collections import OrderedDict

    old: OrderedDict[str, torch.Tensor] = OrderedDict([("norm.scale", torch.tensor([2.5]))])
    old._metadata = OrderedDict([("", {"version": 1}), ("norm", {"version": 1})])  # type: ignore[attr-defined]
    net = torch.nn.Sequential()
    net.add_module("norm", ScaleNorm(4))
    net.load_state_dict(old, strict=True)
    assert net.norm.weight.item() == 2.5 and not hasattr(net.norm, "scale")
    bare = ScaleNorm(4)
    bare.load_state_dict({"scale": torch.tensor([0.5])})  # no metadata at all: a hand-built old dict
    assert bare.weight.item() == 0.5
    assert list(ScaleNorm(4).state_dict()) == ["weight"] and ScaleNorm(4).state_dict()._metadata[""]["version"] == 2
