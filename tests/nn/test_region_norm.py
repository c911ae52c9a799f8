"""Region Normalization (https://arxiv.org/abs/1911.10375): the spec's vector, the official recipe with masks at
another resolution, mask errors, RN-L's regions and affine, the instance-statistics switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normlab.nn import RegionNorm
from normlab.testing.reference_region_norm import region_norm as reference

F64 = torch.float64


def test_spec_vector() -> None:
    x = torch.tensor([[[[1.0, 3.0, 10.0, 14.0]]]], dtype=F64)
    hole = torch.tensor([[[[1, 1, 0, 0]]]])
    y = RegionNorm(1, dtype=F64)(x, mask=hole)
    torch.testing.assert_close(y.detach().flatten(), torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=F64), atol=1e-4,
                               rtol=0)
    # The implicit eps of the official BN-style recipe: eps·NHW/|region| = 2e-5 for both regions here.
    expected = torch.tensor([-1 / (1 + 2e-5) ** 0.5, 1 / (1 + 2e-5) ** 0.5, -2 / (4 + 2e-5) ** 0.5,
                             2 / (4 + 2e-5) ** 0.5], dtype=F64)
    torch.testing.assert_close(y.detach().flatten(), expected)


@pytest.mark.parametrize("mask_shape", [(2, 1, 16, 16), (2, 4, 4, 4), (2, 8, 8)])
def test_rn_b_follows_the_official_recipe_with_masks_resized_by_nearest(mask_shape: tuple[int, ...]) -> None:
    m = RegionNorm(4, dtype=F64)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 4, 8, 8, dtype=F64) * 3 + 1
    hole = torch.rand(mask_shape) > 0.6
    y = m(x, mask=hole)
    torch.testing.assert_close(y, reference(m, x, mask=hole))
    m4 = hole.unsqueeze(1) if hole.dim() == 3 else hole
    region = F.interpolate(m4.double(), size=(8, 8), mode="nearest")
    # Each region separately has zero mean per channel over the batch (before the affine): check through γ = β = 0.
    plain = RegionNorm(4, dtype=F64)(x, mask=hole)
    for r in (region, 1 - region):
        r = r.expand_as(x)
        assert ((plain * r).sum((0, 2, 3)) / r.sum((0, 2, 3)).clamp_min(1)).abs().max() < 1e-10


def test_mask_errors_name_the_sizes() -> None:
    m = RegionNorm(4)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"expected a mask with batch size 2 \(the input's\), got mask of size "
                                         r"\[3, 1, 8, 8\] for input of size \[2, 4, 8, 8\]"):
        m(x, mask=torch.ones(3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"expected a mask with 1 or 4 channels \(the input's C\), got mask of size "
                                         r"\[2, 3, 8, 8\]"):
        m(x, mask=torch.ones(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expected a mask of size \[N, H, W\] or \[N, 1 or C, H, W\], got mask of "
                                         r"size \[2, 8\]"):
        m(x, mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match=r"RN-L \(learnable=True\) finds its regions in the features; expected "
                                         r"mask=None"):
        RegionNorm(4, learnable=True)(x, mask=torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"expected statistics in \('batch', 'instance'\), got 'layer'"):
        RegionNorm(4, statistics="layer")


def test_no_hole_is_batchnorm_and_eval_still_uses_batch_statistics() -> None:
    m = RegionNorm(3).eval()
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(m(x), F.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)
    full_hole = torch.ones(4, 1, 5, 5)
    torch.testing.assert_close(m(x, mask=full_hole), m(x), rtol=1e-5, atol=1e-5)  # the other region is empty


def test_instance_statistics_are_per_sample() -> None:
    m = RegionNorm(3, statistics="instance", dtype=F64)
    x = torch.randn(3, 3, 6, 6, dtype=F64)
    hole = torch.rand(3, 1, 6, 6) > 0.5
    y = m(x, mask=hole)
    torch.testing.assert_close(y[1:2], m(x[1:2], mask=hole[1:2]))
    torch.testing.assert_close(y, reference(m, x, mask=hole))


def test_rn_l_regions_from_the_importance_map() -> None:
    m = RegionNorm(4, learnable=True, dtype=F64)
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    torch.testing.assert_close(m(x), F.batch_norm(x, None, None, training=True))  # zero convs: S = 0.5 < t
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    xr = x.clone().requires_grad_(True)
    y = m(xr)
    torch.testing.assert_close(y, reference(m, x))
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    s = torch.sigmoid(F.conv2d(pooled, m.sa_weight.detach(), padding=3))
    assert 0 < (s >= 0.8).double().mean() < 1  # two non-empty regions in this case
