"""NF-ResNet blocks: activation gains, the expected-variance bookkeeping, signal propagation through a chain, the
block formula and the errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.weight import NONLINEARITY_GAINS, NFBasicBlock, ScaledActivation, nf_expected_stds


@pytest.mark.parametrize("name", sorted(NONLINEARITY_GAINS))
def test_gain_makes_unit_gaussian_unit_variance(name: str) -> None:
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert ScaledActivation(name)(z).std().item() == pytest.approx(1.0, rel=0.01)


def test_expected_stds_bookkeeping() -> None:
    # var: 1 → +α² per block; a conv-shortcut block restarts at 1, so its output is 1 + α².
    betas = nf_expected_stds([False, False, True, False], alpha=0.2)
    assert betas == pytest.approx([1.0, 1.04**0.5, 1.08**0.5, 1.04**0.5])


def test_block_formula() -> None:
    block = NFBasicBlock(4, 4, alpha=0.3, expected_std=1.2)
    with torch.no_grad():
        block.skip_gain.fill_(0.7)
    x = torch.randn(2, 4, 5, 5)
    a = torch.relu(x) * NONLINEARITY_GAINS["relu"] / 1.2
    branch = block.conv2(torch.relu(block.conv1(a)) * NONLINEARITY_GAINS["relu"])
    torch.testing.assert_close(block(x), x + 0.3 * 0.7 * branch)
    torch.testing.assert_close(NFBasicBlock(4, 4)(x), x)  # SkipInit: identity at init


def test_signal_propagation_tracks_expected_variance() -> None:
    # With s = 1, a chain of NF blocks on a unit-variance input keeps Var(h_i) ≈ E[Var h_i] (the paper's §4 claim).
    torch.manual_seed(0)
    resets = [True] + [False] * 5
    betas = nf_expected_stds(resets, alpha=0.5)
    blocks = [NFBasicBlock(16 if i == 0 else 64, 64, alpha=0.5, expected_std=b, skipinit=False)
              for i, b in enumerate(betas)]
    h = torch.randn(16, 16, 12, 12)
    expected_var = 1.0
    for block, reset in zip(blocks, resets):
        with torch.no_grad():
            h = block(h)
        expected_var = (1.0 if reset else expected_var) + 0.25
        assert h.var().item() == pytest.approx(expected_var, rel=0.15)
    assert expected_var == pytest.approx(2.5)


def test_nf_block_parameters_and_errors() -> None:
    block = NFBasicBlock(8, 16, stride=2)
    assert block.resets_variance and block.skip_gain.shape == ()
    names = {n for n, _ in block.named_parameters()}
    assert "shortcut.parametrizations.weight.0.gain" in names
    assert not isinstance(NFBasicBlock(4, 4, skipinit=False).skip_gain, nn.Parameter)
    with pytest.raises(ValueError, match="alpha to be a finite number > 0.0, got 0"):
        NFBasicBlock(4, 4, alpha=0)
    with pytest.raises(ValueError, match="expected_std to be a finite number > 0.0, got -1"):
        NFBasicBlock(4, 4, expected_std=-1)
    with pytest.raises(ValueError, match=r"name to be one of .* got 'swish'"):
        ScaledActivation("swish")
