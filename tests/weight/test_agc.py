"""Adaptive Gradient Clipping: a hand-computed example, unit axes against a float64 loop, the eps floor, the classifier
exclusion, the optimizer hook and the error messages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.testing import reference_weight as ref
from normlab.weight import agc_parameters, attach_agc, clip_grad_agc_, find_classifier, unitwise_norm


def _param(w: torch.Tensor, g: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(w.clone())
    p.grad = g.clone()
    return p


def test_spec_example_clips_and_small_gradients_pass() -> None:
    p = _param(torch.tensor([[3.0, 4.0], [3.0, 4.0]]), torch.tensor([[0.3, 0.4], [0.015, 0.02]]))
    n = clip_grad_agc_([p], clipping=0.01, eps=1e-3)
    assert int(n) == 1  # row 0: ‖G‖ = 0.5 > 0.01·5 → [0.03, 0.04]; row 1: 0.025 < 0.05 is left alone
    torch.testing.assert_close(p.grad, torch.tensor([[0.03, 0.04], [0.015, 0.02]]))


def test_conv_units_are_output_channels_against_float64_loop() -> None:
    w, g = torch.randn(6, 3, 3, 3), torch.randn(6, 3, 3, 3)
    g[::2] *= 0.001  # half the units under the threshold
    p = _param(w, g)
    clip_grad_agc_(p, clipping=0.05)
    torch.testing.assert_close(p.grad.double(), ref.agc(w, g, 0.05, 1e-3, unit_dim=0), rtol=1e-6, atol=1e-9)
    assert torch.equal(p.grad[::2], g[::2])


def test_vectors_and_scalars_are_one_unit_and_eps_lets_zero_params_move() -> None:
    bias = _param(torch.zeros(4), torch.ones(4))
    scalar = _param(torch.zeros(()), torch.tensor(2.0))
    clip_grad_agc_([bias, scalar], clipping=0.01, eps=1e-3)
    # max(‖W‖, eps)·λ = 1e-5: the whole vector is rescaled to that norm, not each entry.
    torch.testing.assert_close(bias.grad, torch.full((4,), 1e-5 / 2))
    torch.testing.assert_close(scalar.grad, torch.tensor(1e-5))


def test_explicit_unit_dim_against_float64_loop() -> None:
    w, g = torch.randn(3, 5, 2, 2), torch.randn(3, 5, 2, 2)
    p = _param(w, g)
    clip_grad_agc_([(p, 1)], clipping=0.02)
    torch.testing.assert_close(p.grad.double(), ref.agc(w, g, 0.02, 1e-3, unit_dim=1), rtol=1e-6, atol=1e-9)
    q = _param(w, g)
    clip_grad_agc_((q, None), clipping=0.02)  # a single pair; None = whole tensor
    torch.testing.assert_close(q.grad.double(), ref.agc(w, g, 0.02, 1e-3, unit_dim=None), rtol=1e-6, atol=1e-9)
    assert unitwise_norm(w, 0).shape == (3, 1, 1, 1)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.up = nn.ConvTranspose2d(4, 3, 2)
        self.head = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(self.conv(x)).mean(dim=(2, 3)))


def test_agc_parameters_excludes_the_classifier_and_knows_transposed_convs() -> None:
    net = _Net()
    params = agc_parameters(net)
    ids = {id(p): d for p, d in params}
    assert id(net.head.weight) not in ids and id(net.head.bias) not in ids
    assert ids[id(net.conv.weight)] == 0 and ids[id(net.up.weight)] == 1 and ids[id(net.conv.bias)] is None
    assert find_classifier(net) == "head"
    assert len(agc_parameters(net, exclude=())) == 6
    assert len(agc_parameters(net, exclude=["conv", "up"])) == 2


def test_agc_parameters_uses_the_layer_axis_for_parametrized_weights() -> None:
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
    net = nn.Sequential(lin, nn.Linear(2, 2))
    params = agc_parameters(net, exclude=["1"])
    shapes = sorted((tuple(p.shape), d) for p, d in params)
    assert shapes == [((2,), None), ((2, 1), 0), ((2, 3), 0)]


def test_attach_agc_clips_before_each_step() -> None:
    torch.manual_seed(0)
    net, ref_net = _Net(), _Net()
    ref_net.load_state_dict(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref_net.parameters(), lr=0.5)
    handle = attach_agc(opt, agc_parameters(net), clipping=0.01)
    x = torch.randn(3, 2, 6, 6)
    for model, optimizer in ((net, opt), (ref_net, ref_opt)):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
    clip_grad_agc_(agc_parameters(ref_net), clipping=0.01)
    opt.step()
    ref_opt.step()
    for a, b in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b)
    handle.remove()


def test_errors() -> None:
    scalar = _param(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"parameters\[0\] of shape \[\] has no output axis 0"):
        clip_grad_agc_([(scalar, 0)])
    with pytest.raises(ValueError, match=r"shape \[4\] has no output axis 1"):
        clip_grad_agc_([(_param(torch.ones(4), torch.ones(4)), 1)])
    with pytest.raises(ValueError, match="groups=2; its weight .* has no single output axis"):
        agc_parameters(nn.Sequential(nn.ConvTranspose2d(4, 4, 2, groups=2), nn.Linear(2, 2)), exclude=["1"])
    with pytest.raises(ValueError, match="clipping to be a finite number > 0, got 0"):
        clip_grad_agc_([scalar], clipping=0)
    with pytest.raises(ValueError, match="eps to be a finite number >= 0, got -1"):
        clip_grad_agc_([scalar], eps=-1)
    with pytest.raises(ValueError, match=r"no child module named one of \['head', 'fc', 'classifier', 'lm_head'\]"):
        agc_parameters(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="exclude entry 'fcc' is not a submodule name"):
        agc_parameters(_Net(), exclude=["fcc"])
    with pytest.raises(TypeError, match="expected a tensor or a \\(tensor, unit_dim\\) pair, got str"):
        clip_grad_agc_(["w"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="attach_agc: expected a torch.optim.Optimizer"):
        attach_agc("sgd", [])  # type: ignore[arg-type]
