"""Tensor-level folds: hand-derived vectors (conv/linear then BN, BN then linear, RepBN), torch's own
fusion, convs, dtypes and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from normlab.nn import BatchNorm
from normlab.nn.rep_batch_norm import RepBatchNorm
from normlab.surgery import (
    fold_affine_into_conv_input,
    fold_affine_into_conv_output,
    fold_affine_into_linear_input,
    fold_affine_into_linear_output,
)

D = torch.float64
W91 = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=D)
B91 = torch.tensor([0.5, -0.5], dtype=D)


def _spec_bn() -> BatchNorm:
    """The §9.1 BatchNorm: μ = [1, 0], var = [4, 0.25], γ = [2, 1], β = [0, 1], eps = 1e-5."""
    bn = BatchNorm(2, channel_dim=-1, dtype=D).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 0.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
        bn.weight.copy_(torch.tensor([2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0]))
    return bn


def test_spec_9_1_linear_then_bn_vector() -> None:
    bn = _spec_bn()
    aff = bn.folded_affine()
    w, b = fold_affine_into_linear_output(W91, B91, aff.scale, aff.shift)
    want_w = torch.tensor([[0.9999988, 1.9999975], [5.99988, -1.99996]], dtype=D)
    torch.testing.assert_close(w, want_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(b, torch.tensor([-0.4999994, 0.0000200], dtype=D), rtol=0, atol=1e-6)
    x = torch.ones(2, dtype=D)
    torch.testing.assert_close(w @ x + b, torch.tensor([2.4999969, 3.99994], dtype=D), rtol=0, atol=1e-6)
    torch.testing.assert_close(w @ x + b, bn(F.linear(x[None], W91, B91))[0], rtol=1e-12, atol=1e-12)
    # PyTorch's own fusion agrees to rounding.
    tw, tb = fuse_linear_bn_weights(
        W91, B91, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias  # type: ignore[arg-type]
    )
    torch.testing.assert_close(w, tw.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(b, tb.detach(), rtol=1e-12, atol=1e-15)


def test_spec_9_2_bn_then_linear_vector() -> None:
    bn = _spec_bn()
    aff = bn.folded_affine()
    w, b = fold_affine_into_linear_input(W91, B91, aff.scale, aff.shift)
    want_w = torch.tensor([[0.9999988, 3.99992], [2.9999963, -1.99996]], dtype=D)
    torch.testing.assert_close(w, want_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(b, torch.tensor([1.5000012, -4.4999963], dtype=D), rtol=0, atol=1e-6)
    x = torch.ones(1, 2, dtype=D)
    y = F.linear(x, w, b)
    torch.testing.assert_close(y[0], torch.tensor([6.49992, -3.49996], dtype=D), rtol=0, atol=1e-6)
    torch.testing.assert_close(y, F.linear(bn(x), W91, B91), rtol=1e-12, atol=1e-12)


def test_spec_3_7_repbn_fold_vector() -> None:
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]], dtype=D)
    rep = RepBatchNorm(2, channel_dim=-1, dtype=D)
    rep(x)  # one training step: running_mean [0.4, 0.5], running_var [1.5666667] * 2
    rep.eval()
    aff = rep.folded_affine()
    torch.testing.assert_close(aff.scale, torch.full((2,), 1.7989329, dtype=D), rtol=0, atol=1e-6)
    torch.testing.assert_close(aff.shift, torch.tensor([-0.3195732, -0.3994665], dtype=D), rtol=0, atol=1e-6)
    w = torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]], dtype=D)
    c = torch.tensor([0.1, 0.2, 0.3], dtype=D)
    w2, c2 = fold_affine_into_linear_input(w, c, aff.scale, aff.shift)
    want_w = torch.tensor([[1.7989329, -1.7989329], [0.8994665, 3.5978658], [0.0, 1.7989329]], dtype=D)
    torch.testing.assert_close(w2, want_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(c2, torch.tensor([0.1798933, -0.7587195, -0.0994665], dtype=D), rtol=0, atol=1e-6)
    y = F.linear(x[0, 0], w2, c2)
    torch.testing.assert_close(y, torch.tensor([-1.6190396, 7.3364786, 3.4983994], dtype=D), rtol=0, atol=1e-6)
    torch.testing.assert_close(y, F.linear(rep(x)[0, 0], w, c), rtol=1e-12, atol=1e-12)


def test_missing_bias_is_created_and_dtypes_are_cast_back() -> None:
    w = torch.randn(3, 4, dtype=torch.bfloat16)
    a, c = torch.rand(4, dtype=D) + 0.5, torch.randn(4, dtype=D)
    w2, b2 = fold_affine_into_linear_input(w, None, a, c)
    assert w2.dtype == b2.dtype == torch.bfloat16 and b2.shape == (3,)
    torch.testing.assert_close(b2.double(), w.double() @ c, rtol=1e-2, atol=1e-2)  # bf16 rounding of the result
    half_bias = torch.zeros(3, dtype=torch.float16)
    w3, b3 = fold_affine_into_linear_output(w.float(), half_bias, torch.ones(3), torch.ones(3))
    assert w3.dtype == torch.float32 and b3.dtype == torch.float16
    assert not w.requires_grad and torch.equal(w3, w.float())  # inputs untouched, a = 1 changes nothing


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_conv_after_norm_folds_exactly_without_zero_padding(groups: int, padding_mode: str) -> None:
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=groups, padding_mode=padding_mode).double()
    a, c = torch.rand(4, dtype=D) + 0.5, torch.randn(4, dtype=D)
    x = torch.randn(2, 4, 5, 5, dtype=D)
    want = conv(x * a.view(1, -1, 1, 1) + c.view(1, -1, 1, 1))
    w, b = fold_affine_into_conv_input(
        conv.weight, conv.bias, a, c, groups=groups, padding=conv.padding, padding_mode=padding_mode
    )
    conv.weight.data, conv.bias.data = w, b
    torch.testing.assert_close(conv(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", [0, "valid"])
def test_conv_after_norm_without_padding_is_exact(padding: int | str) -> None:
    w0, b0 = torch.randn(5, 3, 3, dtype=D), torch.randn(5, dtype=D)
    a, c = torch.rand(3, dtype=D) + 0.5, torch.randn(3, dtype=D)
    x = torch.randn(2, 3, 7, dtype=D)
    w, b = fold_affine_into_conv_input(w0, b0, a, c, padding=padding)
    torch.testing.assert_close(F.conv1d(x, w, b), F.conv1d(x * a[:, None] + c[:, None], w0, b0), rtol=1e-12, atol=1e-12)


def test_conv_after_norm_with_zero_padding_refuses_and_is_indeed_inexact() -> None:
    w0, b0 = torch.randn(2, 2, 3, 3, dtype=D), torch.zeros(2, dtype=D)
    a, c = torch.ones(2, dtype=D), torch.ones(2, dtype=D)
    with pytest.raises(ValueError, match=r"zero padding.*cannot be folded exactly"):
        fold_affine_into_conv_input(w0, b0, a, c, padding=1)
    with pytest.raises(ValueError, match="zero padding"):
        fold_affine_into_conv_input(w0, b0, a, c, padding="same")
    # Why: folding anyway would be wrong at the border (and right in the interior).
    x = torch.randn(1, 2, 4, 4, dtype=D)
    w, b = fold_affine_into_conv_input(w0, b0, a, c, padding=0)
    folded, ref = F.conv2d(x, w, b, padding=1), F.conv2d(x + 1, w0, b0, padding=1)
    torch.testing.assert_close(folded[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])
    assert (folded - ref).abs().max() > 1e-3
    # kernel 1 with "same" pads nothing: allowed.
    fold_affine_into_conv_input(torch.randn(2, 2, 1, 1, dtype=D), None, a, c, padding="same")


def test_conv_then_norm_matches_torch_fusion() -> None:
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    bn = torch.nn.BatchNorm2d(4).double().eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    w, b = fold_affine_into_conv_output(conv.weight, conv.bias, s, bn.bias.detach() - s * bn.running_mean)
    tw, tb = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias  # type: ignore[arg-type]
    )
    torch.testing.assert_close(w, tw.detach(), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(b, tb.detach(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_conv_then_norm_scales_output_channels(groups: int) -> None:
    conv = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=groups).double()
    a, c = torch.rand(6, dtype=D) + 0.5, torch.randn(6, dtype=D)
    x = torch.randn(2, 4, 3, 3, dtype=D)
    want = conv(x) * a.view(1, -1, 1, 1) + c.view(1, -1, 1, 1)
    w, b = fold_affine_into_conv_output(conv.weight, conv.bias, a, c, transposed=True, groups=groups)
    conv.weight.data, conv.bias.data = w, b
    torch.testing.assert_close(conv(x), want, rtol=1e-12, atol=1e-12)


def test_input_errors_name_what_was_expected() -> None:
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"expected scale of size \[4\].*got size \[3\]"):
        fold_affine_into_linear_input(w, None, torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"expected shift of size \[3\]"):
        fold_affine_into_linear_output(w, None, torch.ones(3), torch.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        fold_affine_into_linear_input(w, None, torch.tensor([1.0, float("inf"), 1.0, 1.0]), torch.zeros(4))
    with pytest.raises(ValueError, match=r"expected bias of size \[3\]"):
        fold_affine_into_linear_input(w, torch.zeros(4), torch.ones(4), torch.zeros(4))
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int64"):
        fold_affine_into_linear_input(torch.ones(3, 4, dtype=torch.long), None, torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"expected a 2-D weight, got size \[3\]"):
        fold_affine_into_linear_input(torch.ones(3), None, torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="expected groups"):
        fold_affine_into_conv_input(torch.ones(3, 2, 1), None, torch.ones(4), torch.zeros(4), groups=2)
    with pytest.raises(ValueError, match="expected groups"):
        fold_affine_into_conv_output(torch.ones(4, 2, 1), None, torch.ones(4), torch.zeros(4), groups=0)
