"""Tensor-level residual-stream rewrites against hand-checked numbers and the identities that make them exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normlab.nn import CRMSNorm
from normlab.surgery.stream_math import (
    center_unembed_weights,
    center_writer,
    compress_reader,
    compress_writer,
    fold_ln_into_reader,
    fold_value_bias,
)

# Hand-checked example of TransformerLens's fold_ln (TL layout: out = x W + b, W is d_model x out).
X = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
GAMMA = torch.tensor([1.0, 2.0, 0.5, -1.0], dtype=torch.float64)
BETA = torch.tensor([0.1, 0.0, -0.2, 0.3], dtype=torch.float64)
W_TL = torch.tensor([[1.0, 0.0], [2.0, 1.0], [-1.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
B = torch.tensor([0.5, -0.5], dtype=torch.float64)


def test_fold_ln_matches_the_hand_checked_example() -> None:
    w, b = fold_ln_into_reader(W_TL.T, B, GAMMA, BETA)
    expected_w = torch.tensor([[-0.125, 0.125], [2.875, 2.125], [-1.625, 0.625], [-1.125, -2.875]], dtype=torch.float64)
    torch.testing.assert_close(w.T, expected_w, rtol=0, atol=1e-12)
    assert b is not None
    torch.testing.assert_close(b, torch.tensor([0.8, 0.2], dtype=torch.float64), rtol=0, atol=1e-12)
    ln_path = F.layer_norm(X, (4,), GAMMA, BETA, eps=1e-5) @ W_TL + B
    ln_pre_path = F.layer_norm(X, (4,), eps=1e-5) @ w.T + b
    expected = torch.tensor([-4.9157433, -0.5505521], dtype=torch.float64)
    torch.testing.assert_close(ln_path, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ln_pre_path, expected, rtol=0, atol=1e-6)
    # A fixed scale in place of the LayerNorm: the centred reader absorbs the missing mean subtraction.
    torch.testing.assert_close((X / 2.0) @ w.T + b, torch.tensor([-2.29375, -0.20625], dtype=torch.float64))


def test_fold_ln_without_centring_or_affine() -> None:
    w, b = fold_ln_into_reader(W_TL.T, None, None, None, center=False)
    assert b is None and torch.equal(w, W_TL.T)
    w, b = fold_ln_into_reader(W_TL.T, None, None, BETA, center=False)
    torch.testing.assert_close(b, BETA @ W_TL)  # a missing bias is created when β is folded


def test_fold_ln_keeps_dtypes_and_does_not_mutate() -> None:
    w16, g, beta = W_TL.T.half(), GAMMA.float(), BETA.float()
    before = w16.clone()
    w, b = fold_ln_into_reader(w16, None, g, beta)
    assert w.dtype == torch.float16 and b is not None and b.dtype == torch.float16
    assert torch.equal(w16, before)


def test_crms_scalar_check_and_compressed_reader() -> None:
    x = torch.tensor([1.0, -2.0, 3.0, -2.0], dtype=torch.float64)  # zero-mean
    z = x[:3]
    crms = CRMSNorm(3, affine=False)(z)
    torch.testing.assert_close(
        crms, torch.tensor([0.471404, -0.942808, 1.414212], dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(crms, F.layer_norm(x, (4,), eps=1e-5)[:3])
    w = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(compress_reader(w) @ crms, w @ F.layer_norm(x, (4,), eps=1e-5))


def test_writer_centring_and_compression_round_trip() -> None:
    w, b = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    wc, bc = center_writer(w, b, dim=0)
    assert bc is not None
    h = torch.randn(3, dtype=torch.float64)
    out = wc @ h + bc
    assert abs(out.sum().item()) < 1e-12  # the write is zero-mean
    torch.testing.assert_close(out - (w @ h + b), -(w @ h + b).mean().expand(6))  # only the mean changed
    wz, bz = compress_writer(wc, bc, dim=0)
    assert bz is not None and wz.shape == (5, 3)
    z = wz @ h + bz
    torch.testing.assert_close(torch.cat([z, -z.sum(0, keepdim=True)]), out)  # the dropped coordinate is −Σ
    table = torch.randn(7, 6, dtype=torch.float64)
    tc, _ = center_writer(table, dim=-1)
    torch.testing.assert_close(tc.sum(-1), torch.zeros(7, dtype=torch.float64), atol=1e-12, rtol=0)
    assert compress_writer(tc, dim=-1)[0].shape == (7, 5)


def test_center_unembed_keeps_log_softmax() -> None:
    w, b = torch.randn(11, 4, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    wc, bc = center_unembed_weights(w, b)
    assert bc is not None
    h = torch.randn(3, 4, dtype=torch.float64)
    before, after = h @ w.T + b, h @ wc.T + bc
    assert (after - before).abs().max() > 1e-3  # the logits did move ...
    torch.testing.assert_close(after.log_softmax(-1), before.log_softmax(-1))  # ... by a per-row constant


def test_fold_value_bias_in_an_attention() -> None:
    n, heads, dh, d = 5, 2, 3, 4
    v = torch.randn(n, heads * dh, dtype=torch.float64)
    b_v = torch.randn(heads * dh, dtype=torch.float64)
    attn = torch.randn(heads, n, n, dtype=torch.float64).softmax(-1)
    w_o, b_o = torch.randn(d, heads * dh, dtype=torch.float64), torch.randn(d, dtype=torch.float64)

    def out(values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx = torch.einsum("hqk,khd->qhd", attn, values.view(n, heads, dh)).reshape(n, heads * dh)
        return ctx @ w_o.T + bias

    torch.testing.assert_close(out(v, fold_value_bias(w_o, b_o, b_v)), out(v + b_v, b_o))


def test_errors_name_the_parameter() -> None:
    with pytest.raises(TypeError, match="fold_ln_into_reader: expected weight to be a floating-point tensor"):
        fold_ln_into_reader(torch.ones(2, 2, dtype=torch.long), None, None, None)
    with pytest.raises(ValueError, match=r"expected ln_weight of size \[3\], got size \[2\]"):
        fold_ln_into_reader(torch.ones(2, 3), None, torch.ones(2), None)
    with pytest.raises(ValueError, match=r"fold_value_bias: expected value_bias of size \[4\]"):
        fold_value_bias(torch.ones(2, 4), None, torch.ones(3))
    with pytest.raises(ValueError, match="compress_reader: expected a weight with at least 2 input columns"):
        compress_reader(torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"center_writer: expected dim in \[-2, 1\]"):
        center_writer(torch.ones(3, 2), dim=2)
