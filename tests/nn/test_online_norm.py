"""Online Normalization (https://arxiv.org/abs/1905.05894): the spec's forward vector, a hand-checked backward of
the control processes, forward and backward against the float64 reference, batch-size independence."""

from __future__ import annotations

import copy

import pytest
import torch

from normlab.nn import OnlineNorm
from normlab.testing.reference_online_norm import online_norm as reference
from normlab.testing.reference_online_norm import online_norm_backward, online_normalize

F64 = torch.float64


def test_spec_forward_vector() -> None:
    m = OnlineNorm(1, alpha_fwd=0.5, eps=0.0, ecm=None, dtype=F64)
    y = m(torch.tensor([[[1.0, 3.0]], [[0.0, 2.0]]], dtype=F64))  # two samples, one channel, 2 positions
    torch.testing.assert_close(y.detach().flatten(), torch.tensor([1.0, 3.0, -(0.5**0.5), 0.5**0.5], dtype=F64))
    assert m.running_mean.item() == pytest.approx(1.0) and m.running_var.item() == pytest.approx(1.5)


def test_hand_checked_backward_of_the_control_processes() -> None:
    m = OnlineNorm(1, alpha_fwd=0.5, alpha_bkw=0.5, eps=0.0, ecm=None, affine=False, dtype=F64)
    x = torch.tensor([[[1.0, 3.0]], [[0.0, 2.0]]], dtype=F64, requires_grad=True)
    m(x).backward(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=F64))
    # t=1: y=[1,3], s=1, u=v=0: δ'=[1,0], v=0.5, ∂x=[1,0], u=0.5.
    # t=2: y=[-1,1]/√2, s=√2: δ'=[0,1]-0.25·y, v=0.5+mean(δ'·y), ∂x=δ'/√2-0.25, u=0.5+mean(∂x).
    r = 0.5**0.5
    expected = torch.tensor([[[1.0, 0.0]], [[0.25 * r / 2**0.5 - 0.25, (1 - 0.25 * r) / 2**0.5 - 0.25]]], dtype=F64)
    torch.testing.assert_close(x.grad, expected)  # [[1, 0], [-0.125, 0.33211]]
    torch.testing.assert_close(x.grad[1].flatten(), torch.tensor([-0.125, 0.332107], dtype=F64), atol=1e-6, rtol=0)
    assert m.control_v.item() == pytest.approx(0.728553, abs=1e-6)  # 0.5 + mean([-0.125, 0.582107])
    assert m.control_u.item() == pytest.approx(0.603553, abs=1e-6)  # 0.5 + mean([-0.125, 0.332107])


@pytest.mark.parametrize("ecm", ["ac", "ls", None])
def test_forward_and_backward_match_the_float64_reference(ecm: str | None) -> None:
    m = OnlineNorm(5, alpha_fwd=0.9, alpha_bkw=0.8, ecm=ecm, dtype=F64)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
        m.running_mean.normal_(0.0, 0.5), m.running_var.uniform_(0.5, 2.0)
        m.control_u.normal_(0.0, 0.1), m.control_v.normal_(0.0, 0.1)
    x = (torch.randn(4, 5, 3, 3, dtype=F64) * 2 + 1).requires_grad_(True)
    g = torch.randn(4, 5, 3, 3, dtype=F64)
    before = copy.deepcopy(m)
    y = m(x)
    torch.testing.assert_close(y, reference(before, x.detach()))
    y.backward(g)
    # δ at the normalised output: ordinary autograd through the affine and the ECM, at the reference's y.
    y_norm, _, mean, var = online_normalize(before, x.detach())
    y_norm.requires_grad_(True)
    out = y_norm * before.weight.detach().reshape(1, -1, 1, 1) + before.bias.detach().reshape(1, -1, 1, 1)
    out = out.clamp(-5, 5) if ecm == "ac" else out / torch.sqrt(out.square().mean((1, 2, 3), keepdim=True) + 1e-5) \
        if ecm == "ls" else out
    (delta,) = torch.autograd.grad(out, y_norm, g)
    gx, u, v = online_norm_backward(before, x.detach(), delta)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(m.control_u, u)
    torch.testing.assert_close(m.control_v, v)
    torch.testing.assert_close(m.running_mean, mean)
    torch.testing.assert_close(m.running_var, var)


def test_a_batch_is_a_stream_of_single_samples() -> None:
    m = OnlineNorm(3, alpha_fwd=0.8, alpha_bkw=0.7, ecm="ls", dtype=F64)
    one = copy.deepcopy(m)
    x = torch.randn(5, 3, 4, 4, dtype=F64, requires_grad=True)
    g = torch.randn(5, 3, 4, 4, dtype=F64)
    m(x).backward(g)
    xs = x.detach().clone().requires_grad_(True)
    for t in range(5):  # batch size 1, five steps: forward then backward per sample, as the streams run
        one(xs[t : t + 1]).backward(g[t : t + 1])
    torch.testing.assert_close(xs.grad, x.grad)
    for name in ("running_mean", "running_var", "control_u", "control_v"):
        torch.testing.assert_close(getattr(one, name), getattr(m, name), msg=name)


def test_eval_uses_the_streams_and_errors() -> None:
    m = OnlineNorm(2, ecm=None).eval()
    m.running_mean.copy_(torch.tensor([1.0, -1.0]))
    m.running_var.copy_(torch.tensor([4.0, 0.25]))
    x = torch.randn(3, 2, 4)
    expected = (x - m.running_mean.reshape(1, 2, 1)) / torch.sqrt(m.running_var.reshape(1, 2, 1) + 1e-5)
    torch.testing.assert_close(m(x), expected)
    with pytest.raises(ValueError, match=r"expected ecm in \('ac', 'ls', None\), got 'bn'"):
        OnlineNorm(2, ecm="bn")
    with pytest.raises(ValueError, match=r"expected alpha_fwd in \[0, 1\], got 1.5"):
        OnlineNorm(2, alpha_fwd=1.5)
    assert OnlineNorm(4)(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)  # batch size 1, one position: fine
