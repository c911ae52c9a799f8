"""PowerNorm: hand-derived behaviour vectors, the approximate backward against a float64 re-statement of the
official recursion, warm-up, masks, GroupScaling, the paper switch, folding and errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from normlab import PowerNorm
from normlab.functional import group_scaling, power_norm

F64 = torch.float64

BATCHES = [
    [[1, 2, 3, 4], [-1, 0.5, 2, -2], [0, 1, -1, 1]],
    [[2, -1, 0.5, 1], [1, 1, 1, -3], [0, 2, -1, 0]],
    [[0.5, 0.5, 2, 1], [-2, 1, 1, 1], [1, -1, 0, 2]],
]
MASKS = [None, torch.tensor([True, True, False]), None]
DY = [[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 1]]
# y[0], running_phi after, dL/d(scaled x)[0], ema_gz after
TABLE = [
    ([0.7745946, 1.095446, 0.8911297, 1.0820004], [0.6666576, 1.3333157, 0.9066623, 1.0933288],
     [1.224744, 0, 0, 0.9563627], [0.2581982, 0.5908186, -0.3500672, 0.6794528]),
    ([1.1093974, -0.7559252, 1.1546786, 0.9701361], [0.729991, 1.2699836, 0.8459957, 1.1539945],
     [0.8519346, 0.0533805, 0.0737984, 0.7164106], [0.6107842, 1.4570029, -1.1095856, 0.9575349]),
    ([1.1703872, 0.887341, 1.3752209, 0.5887425], [0.77699, 1.2229835, 0.8480623, 1.1519276],
     [0.8476171, -0.1445466, 0.1639102, 0.8863811], [1.2906471, 1.2565112, -0.995918, 1.4985672]),
]


def close(got: Tensor, expected: list[float], atol: float = 2e-6) -> None:
    torch.testing.assert_close(got.detach(), torch.tensor(expected, dtype=F64), rtol=0, atol=atol)


def test_group_scaling_vector() -> None:
    close(group_scaling(torch.tensor([1.0, 2, 3, 4], dtype=F64), 2), [0.6324543, 1.2649085, 0.8485278, 1.1313704])


def test_spec_behaviour_vectors() -> None:
    pn = PowerNorm(4, group_num=2, warmup_iters=2, dtype=F64).train()
    for xb, mask, (y0, phi, dxs0, ema) in zip(BATCHES, MASKS, TABLE):
        x = torch.tensor(xb, dtype=F64)
        # The table's gradient is taken with respect to the group-scaled input: feed it to the stage after GroupScaling.
        xs = group_scaling(x, 2).requires_grad_(True)
        kwargs = pn.functional_kwargs() | {"group_num": None}
        y = power_norm(xs, mask=mask, **kwargs)
        y.backward(torch.tensor(DY, dtype=F64))
        close(y[0], y0)
        close(pn.running_phi, phi)
        assert xs.grad is not None
        close(xs.grad[0], dxs0)
        close(pn.ema_gz, ema)
    pn.eval()
    close(pn(torch.tensor([[1.0, 2, 3, 4]], dtype=F64))[0], [0.7174946, 1.143792, 0.921403, 1.0541207])


class PNRecursion:
    """Float64 re-statement of the official MaskPowerNorm step (forward, approximate backward) on group-scaled
    tokens."""

    def __init__(self, c: int, warmup: int, af: float = 0.9, ab: float = 0.9, eps: float = 1e-5, paper: bool = False):
        self.phi, self.u = torch.ones(c, dtype=F64), torch.zeros(c, dtype=F64)
        self.t, self.warmup, self.af, self.ab, self.eps, self.paper = 0, warmup, af, ab, eps, paper

    def step(self, xs: Tensor, mask: Tensor | None, dy: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.t += 1
        rows = xs.reshape(-1, xs.shape[-1])
        valid = rows if mask is None else rows[mask.reshape(-1)]
        psi2 = (valid**2).mean(0)
        stat = psi2 if self.t <= self.warmup else self.phi
        z = xs / torch.sqrt(stat + self.eps)
        y = w * z + b
        if self.t < self.warmup:
            self.phi = self.phi * (self.t - 1) / self.t + psi2 / self.t
        self.phi = self.af * self.phi + (1 - self.af) * psi2
        g = dy * w
        gt = g - (1 - self.ab) * self.u * z
        self.u = self.u + (gt * z).reshape(-1, xs.shape[-1]).mean(0)
        dxs = gt / torch.sqrt((stat if self.paper else psi2) + self.eps)
        return y, dxs, (dy * z).reshape(-1, xs.shape[-1]).sum(0)


@pytest.mark.parametrize("divisor", ["batch", "forward"])
def test_custom_backward_matches_official_recursion(divisor: str) -> None:
    g = torch.Generator().manual_seed(5)
    c = 6
    pn = PowerNorm(c, group_num=3, warmup_iters=3, backward_divisor=divisor, dtype=F64).train()  # type: ignore[arg-type]
    with torch.no_grad():
        pn.weight.copy_(torch.linspace(-1.0, 2.0, c))
        pn.bias.copy_(torch.linspace(0.5, -0.5, c))
    sim = PNRecursion(c, warmup=3, paper=divisor == "forward")
    for step in range(6):  # steps 4-6 normalize with the running quadratic mean
        x = (torch.randn(3, 4, c, generator=g, dtype=F64) * (1 + step)).requires_grad_(True)
        mask = torch.ones(3, 4, dtype=torch.bool)
        mask[step % 3, 1 + step % 2 :] = False
        dy = torch.randn(3, 4, c, generator=g, dtype=F64)
        pn.zero_grad()
        y = pn(x, mask=mask)
        y.backward(dy)
        xr = x.detach().requires_grad_(True)
        xs = group_scaling(xr, 3)
        ey, edxs, edw = sim.step(xs.detach(), mask, dy, pn.weight.detach(), pn.bias.detach())
        (edx,) = torch.autograd.grad(xs, xr, edxs)  # the recursion's gradient pulled back through GroupScaling
        torch.testing.assert_close(y.detach(), ey, rtol=1e-12, atol=1e-12)
        assert x.grad is not None and pn.weight.grad is not None and pn.bias.grad is not None
        torch.testing.assert_close(x.grad, edx, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pn.weight.grad, edw, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pn.bias.grad, dy.reshape(-1, c).sum(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pn.running_phi, sim.phi, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pn.ema_gz, sim.u, rtol=1e-12, atol=1e-12)
    assert int(pn.iters) == 6


def test_warmup_switches_to_running_statistic() -> None:
    pn = PowerNorm(2, group_num=None, warmup_iters=1, dtype=F64).train()
    x1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    pn(x1)  # t = 1 = warmup: batch statistic; warm-up update skipped (t < warmup is false), EMA only
    phi1 = 0.9 * 1.0 + 0.1 * (x1**2).mean(0)
    torch.testing.assert_close(pn.running_phi, phi1)
    x2 = torch.tensor([[10.0, -1.0], [5.0, 2.0]], dtype=F64)
    y2 = pn(x2)  # t = 2 > warmup: the running statistic from before this step
    torch.testing.assert_close(y2, x2 / torch.sqrt(phi1 + 1e-5))


def test_first_step_running_phi_is_the_batch_statistic() -> None:
    pn = PowerNorm(3, group_num=None).train()
    with torch.no_grad():
        pn.running_phi.fill_(7.0)
    x = torch.randn(4, 5, 3)
    pn(x)
    torch.testing.assert_close(pn.running_phi, (x**2).mean((0, 1)))


def test_mask_excludes_padding_from_statistics_and_two_dim_input() -> None:
    pn = PowerNorm(2, group_num=None, dtype=F64).train()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [50.0, -60.0]], dtype=F64)
    y = pn(x, mask=torch.tensor([1, 1, 0]))
    torch.testing.assert_close(y, x / torch.sqrt(torch.tensor([5.0, 10.0], dtype=F64) + 1e-5))


def test_folded_affine_keeps_group_scaling() -> None:
    pn = PowerNorm(4, group_num=2, warmup_iters=2, dtype=F64).train()
    for _ in range(3):
        pn(torch.randn(2, 3, 4, dtype=F64))
    with torch.no_grad():
        pn.weight.uniform_(-1, 1)
        pn.bias.uniform_(-1, 1)
    pn.eval()
    fa = pn.folded_affine()
    assert fa.keep is pn.group_scaling
    x = torch.randn(2, 3, 4, dtype=F64)
    torch.testing.assert_close(pn(x), fa.keep(x) * fa.scale + fa.shift, rtol=1e-12, atol=1e-12)
    assert PowerNorm(4, group_num=None).eval().folded_affine().keep is None


def test_loads_official_state_dict_shapes() -> None:
    src = {
        "weight": torch.full((4,), 2.0), "bias": torch.zeros(4), "iters": torch.tensor(9),
        "running_phi": torch.arange(1.0, 5.0).reshape(1, 4, 1, 1), "ema_gz": torch.ones(1, 4, 1, 1),
    }
    pn = PowerNorm(4)
    pn.load_state_dict(src)
    torch.testing.assert_close(pn.running_phi, torch.arange(1.0, 5.0))
    assert int(pn.iters) == 9


def test_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"group_num to be None or a positive divisor of num_features=6, got 4"):
        PowerNorm(6, group_num=4)
    with pytest.raises(ValueError, match=r"backward_divisor 'batch' or 'forward', got 'paper'"):
        PowerNorm(6, backward_divisor="paper")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"alpha_fwd in \[0, 1\], got 1.5"):
        PowerNorm(6, alpha_fwd=1.5)
    pn = PowerNorm(6, group_num=2)
    with pytest.raises(ValueError, match=r"given num_features=6 .*but got input of size \[2, 5, 4\]"):
        pn(torch.randn(2, 5, 4))
    with pytest.raises(TypeError, match=r"expected a bool or integer mask"):
        pn(torch.randn(2, 5, 6), mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel when training, got input of size"):
        pn(torch.randn(1, 6))
