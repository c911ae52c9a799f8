"""Weight Standardization and Scaled WS: hand-checked rows, the float64 reference, gradients, the layers,
composition with other layers, baking before a fold, and the error messages."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from normlab.surgery import fold_norms
from normlab.testing import reference_weight as ref
from normlab.weight import (
    WS_VARIANTS,
    ScaledStdConv2d,
    WSConv2d,
    bake_weights,
    scaled_standardize_weight,
    scaled_weight_standardization,
    standardize_weight,
    weight_standardization,
)

ROW = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)


def test_ws_row_123_per_variant() -> None:
    # Centred row [-1, 0, 1]: unbiased std 1, biased std sqrt(2/3).
    expected = {
        "official": 1 / (1 + 1e-5),  # the paper's code: [-0.99999, 0, 0.99999]
        "tf": 1 / (math.sqrt(2 / 3) + 1e-5),
        "bcn": 1 / math.sqrt(1 + 1e-5),
        "timm": 1 / math.sqrt(2 / 3 + 1e-6),  # [-1.2247, 0, 1.2247]
    }
    for variant, a in expected.items():
        out = standardize_weight(ROW, variant=variant)
        torch.testing.assert_close(out, torch.tensor([[-a, 0.0, a]], dtype=torch.float64), rtol=1e-12, atol=0)
    assert standardize_weight(ROW)[0, 0].item() == pytest.approx(-0.99999, abs=1e-8)
    assert standardize_weight(ROW, variant="timm")[0, 2].item() == pytest.approx(1.2247, abs=1e-4)


def test_scaled_ws_row_123_both_variants() -> None:
    # (W - 2) / sqrt(3 · 2/3) = [-0.7071, 0, 0.7071] for DeepMind and for timm with γ = 1.
    for variant in ("deepmind", "timm"):
        out = scaled_standardize_weight(ROW, variant=variant)
        torch.testing.assert_close(out, torch.tensor([[-0.5**0.5, 0.0, 0.5**0.5]], dtype=torch.float64),
                                   rtol=1e-5, atol=0)


def test_scaled_ws_eps_floor_is_max_not_sum() -> None:
    # N·Var below eps: DeepMind divides by sqrt(eps); timm by sqrt(Var + eps)·sqrt(N).
    w = torch.tensor([[0.0, 0.0, 3e-3]], dtype=torch.float64)  # var = 2e-6, N·var = 6e-6 < 1e-4
    c = w - w.mean()
    torch.testing.assert_close(scaled_standardize_weight(w), c / math.sqrt(1e-4))
    torch.testing.assert_close(scaled_standardize_weight(w, variant="timm"), c / math.sqrt(2e-6 + 1e-6) / math.sqrt(3))


@pytest.mark.parametrize("variant", sorted(WS_VARIANTS))
def test_ws_matches_float64_reference(variant: str) -> None:
    w = torch.randn(6, 3, 3, 3)
    v = WS_VARIANTS[variant]
    expected = ref.standardize(w, v.eps, v.unbiased, v.eps_inside)
    torch.testing.assert_close(standardize_weight(w.double(), variant=variant), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(standardize_weight(w, variant=variant).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["deepmind", "timm"])
def test_scaled_ws_matches_float64_reference(variant: str) -> None:
    w, gain = torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    w[2] *= 1e-3  # a row under DeepMind's eps floor
    eps = {"deepmind": 1e-4, "timm": 1e-6}[variant]
    expected = ref.scaled_standardize(w, gain.tolist(), eps, variant, gamma=1.7)
    out = scaled_standardize_weight(w, gain, variant=variant, gamma=1.7)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_low_precision_is_standardized_in_float32() -> None:
    w = torch.randn(4, 8).to(torch.bfloat16)
    out = standardize_weight(w)
    assert out.dtype == torch.bfloat16
    expected = ref.standardize(w.float(), 1e-5, True, False)
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


def test_gradcheck_float64() -> None:
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    gain = torch.rand(3, dtype=torch.float64, requires_grad=True)
    for variant in WS_VARIANTS:
        assert torch.autograd.gradcheck(lambda t, v=variant: standardize_weight(t, variant=v), (w,))
    for variant in ("deepmind", "timm"):
        assert torch.autograd.gradcheck(lambda t, g, v=variant: scaled_standardize_weight(t, g, variant=v), (w, gain))


def test_constant_filter_gives_zero_weight_and_finite_gradient() -> None:
    # The official code gives NaN gradients here (eps outside the square root); the value is the same.
    w = torch.randn(3, 4)
    w[1] = 0.5
    w.requires_grad_(True)
    out = standardize_weight(w)
    assert torch.equal(out[1], torch.zeros(4))
    out.pow(2).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_wsconv2d_equals_conv_with_reference_weight_and_keeps_stats_per_filter() -> None:
    conv = WSConv2d(3, 8, 3, padding=1, bias=True)
    raw = conv.parametrizations.weight.original
    x = torch.randn(2, 3, 10, 10)
    expected_w = ref.standardize(raw, 1e-5, True, False).float()
    torch.testing.assert_close(conv(x), F.conv2d(x, expected_w, conv.bias, padding=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.mean(dim=(1, 2, 3)), torch.zeros(8), rtol=0, atol=1e-6)
    assert set(conv.state_dict()) == {"bias", "parametrizations.weight.original"}
    before = raw.detach().clone()
    conv.reset_parameters()  # re-initialises the stored weight, not a temporary
    assert not torch.equal(before, conv.parametrizations.weight.original)


def test_scaled_std_conv2d_keeps_unit_variance_and_learns_gain() -> None:
    conv = ScaledStdConv2d(64, 64, 3, padding=1)
    assert set(conv.state_dict()) == {"bias", "parametrizations.weight.original", "parametrizations.weight.0.gain"}
    assert torch.equal(conv.bias, torch.zeros(64)) and torch.equal(conv.gain, torch.ones(64))
    # ‖Ŵ_o‖² = 1 for every unit, so an i.i.d. unit-variance input gives unit-variance outputs.
    torch.testing.assert_close(conv.weight.pow(2).sum(dim=(1, 2, 3)), torch.ones(64), rtol=1e-4, atol=0)
    y = conv(torch.randn(8, 64, 12, 12))[:, :, 1:-1, 1:-1]
    assert y.var().item() == pytest.approx(1.0, rel=0.05)
    conv(torch.randn(2, 64, 4, 4)).sum().backward()
    assert conv.gain.grad is not None and conv.gain.grad.abs().sum() > 0


def test_scaled_ws_timm_switch_gain_init_and_gamma() -> None:
    conv = ScaledStdConv2d(4, 6, 3, variant="timm", gamma=1.7139588594436646, gain_init=0.0)
    assert torch.equal(conv.weight, torch.zeros_like(conv.weight))  # gain 0: timm's SkipInit emulation
    conv.gain.data.fill_(1.0)
    raw = conv.parametrizations.weight.original
    expected = ref.scaled_standardize(raw, [1.0] * 6, 1e-6, "timm", 1.7139588594436646)
    torch.testing.assert_close(conv.weight.double(), expected, rtol=1e-5, atol=1e-6)


LAYERS = {
    "linear": lambda: nn.Linear(6, 4),
    "conv1d": lambda: nn.Conv1d(3, 5, 3),
    "conv3d": lambda: nn.Conv3d(2, 3, 2),
    "grouped_conv2d": lambda: nn.Conv2d(4, 4, 3, groups=2),
}
INPUTS = {
    "linear": (2, 6),
    "conv1d": (2, 3, 7),
    "conv3d": (2, 2, 4, 4, 4),
    "grouped_conv2d": (2, 4, 6, 6),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_parametrizations_compose_with_any_linear_or_conv(kind: str) -> None:
    ws, sws = LAYERS[kind](), LAYERS[kind]()
    w_ws, w_sws = ws.weight.detach().double(), sws.weight.detach().double()
    weight_standardization(ws)
    scaled_weight_standardization(sws, variant="timm")
    torch.testing.assert_close(ws.weight.double(), ref.standardize(w_ws, 1e-5, True, False), rtol=1e-5, atol=1e-6)
    expected = ref.scaled_standardize(w_sws, [1.0] * w_sws.shape[0], 1e-6, "timm", 1.0)
    torch.testing.assert_close(sws.weight.double(), expected, rtol=1e-5, atol=1e-6)
    x = torch.randn(INPUTS[kind])
    assert ws(x).shape == sws(x).shape


def test_ws_then_norm_in_a_model_trains() -> None:
    net = nn.Sequential(WSConv2d(1, 8, 3, padding=1, bias=False), nn.GroupNorm(4, 8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 4
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    first = F.cross_entropy(net(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first


def test_bake_weights_then_fold_keeps_eval_outputs() -> None:
    net = nn.Sequential(WSConv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU())
    net.train()
    net(torch.randn(8, 3, 8, 8))  # non-trivial running stats
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = net(x)
    with pytest.raises(ValueError, match="refused to fold"):  # the stored weight is not the conv's weight
        fold_norms(net)
    baked = bake_weights(net)
    assert baked == ["0.weight"] and not parametrize.is_parametrized(net[0]) and type(net[0]) is nn.Conv2d
    torch.testing.assert_close(net(x), expected)
    folded = fold_norms(net).model
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"output axis .* got shape \[5\]"):
        standardize_weight(torch.randn(5))
    with pytest.raises(ValueError, match="fan-in >= 2.*fan-in 1"):
        weight_standardization(nn.Conv2d(4, 4, 1, groups=4))
    with pytest.raises(ValueError, match="output axis 1"):
        weight_standardization(nn.ConvTranspose2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"variant to be one of \['bcn', 'official', 'tf', 'timm'\], got 'paper'"):
        standardize_weight(ROW, variant="paper")
    with pytest.raises(ValueError, match="eps to be a finite number > 0, got 0"):
        WSConv2d(3, 4, 3, eps=0)
    with pytest.raises(ValueError, match=r"gain with 1 entries .* got \[2\]"):
        scaled_standardize_weight(ROW, torch.ones(2))
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        standardize_weight(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="has no tensor attribute 'kernel'"):
        weight_standardization(nn.Linear(3, 3), "kernel")
    with pytest.raises(TypeError, match="bake_weights: expected an nn.Module"):
        bake_weights("model")  # type: ignore[arg-type]
