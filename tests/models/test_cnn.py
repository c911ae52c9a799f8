"""DigitsCNN: builds with every channel-capable norm, learns, and validates its config."""

from __future__ import annotations

import pytest
import torch

from normlab.models import CNNConfig, DigitsCNN


@pytest.mark.parametrize("norm", ["batch_norm", "group_norm", "layer_norm", "identity"])
def test_forward_backward_shapes(norm: str) -> None:
    model = DigitsCNN(CNNConfig(norm=norm, channels=[8, 16]))
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    out = model(x, labels=y, output_hidden_states=True)
    assert out.logits.shape == (4, 10)
    assert out.hidden_states is not None and len(out.hidden_states) == 2
    assert out.hidden_states[1].shape == (4, 16, 4, 4)  # max-pooled after the second block
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_overfits_a_tiny_batch() -> None:
    model = DigitsCNN(CNNConfig(norm="group_norm", channels=[8, 8]))
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model(x, labels=y).loss.item()
    for _ in range(60):
        opt.zero_grad()
        loss = model(x, labels=y).loss
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="channels"):
        CNNConfig(channels=[8, 0])
    with pytest.raises(ValueError, match="token tensors"):
        CNNConfig(norm="power_norm")
    with pytest.raises(KeyError, match="unknown norm"):
        CNNConfig(norm="bathc_norm")
    with pytest.raises(ValueError, match=r"unknown keys \['width'\]"):
        CNNConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match=r"expected input of shape \[B, 1, H, W\]"):
        DigitsCNN(CNNConfig())(torch.rand(2, 3, 8, 8))
