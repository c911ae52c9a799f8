"""UnifiedNorm: hand-derived forward/backward test vectors (one window k = 2, warm-up 3) and an outlier demo,
the custom backward
against a float64 re-statement of the official recursion (including the clamped-ratio phase), masks, warm-up,
``iters`` semantics, folding and errors. The generic contract lives in tests/test_contract.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from normlab import UnifiedNorm

F64 = torch.float64


def t64(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows, dtype=F64)


X_STEPS = [
    [[1, 2], [3, -1], [0.5, 0.5]],
    [[2, 0], [-1, 1], [1, 1]],
    [[0.5, -2], [1.5, 1], [-1, 0]],
    [[1, 1], [1, -1], [2, 0]],
]
DY = [[1, 0], [0, 1], [1, 1]]
# Hand-derived from the official UN1d step (k = 2, warmup = 3):
# t, var used, y[0], running_var after, dX[0], ema_gz after, dweight
TABLE = [
    ([3.4166667, 1.75], [0.541001, 1.5118536], [1.2416667, 1.075],
     [0.5330839, 0.0143985], [0.02705, -0.0125988], [0.8115015, -0.3779634]),
    ([2.0, 0.6666667], [1.41421, 0.0], [1.3175, 1.0341667],
     [0.6120499, 0.0], [0.0950555, 0.0703101], [2.121315, 2.4494714]),
    ([1.5275252, 1.0540926], [0.404552, -1.9479983], [1.3385025, 1.0361593],
     [0.7717358, 0.2283212], [0.1141627, 0.120337], [-0.404552, 0.9739991]),
    ([1.5275252, 1.0540926], [0.8091041, 0.9739991], [1.3574048, 1.0379526],
     [0.7197712, -0.1027445], [0.1364591, 0.1083033], [2.4273122, -0.9739991]),
]


def close(got: Tensor, expected: list[float], atol: float = 2e-6) -> None:
    torch.testing.assert_close(got.detach(), torch.tensor(expected, dtype=F64), rtol=0, atol=atol)


def test_spec_forward_and_backward_tables() -> None:
    un = UnifiedNorm(2, window_size=2, warmup_iters=3, dtype=F64).train()
    for t, (xb, (var, y0, rv, dx0, ema, dw)) in enumerate(zip(X_STEPS, TABLE), start=1):
        x = t64(xb).requires_grad_(True)
        un.zero_grad()
        y = un(x)
        y.backward(t64(DY))
        assert int(un.iters) == t
        # The statistic used, recovered from the output (weight 1, bias 0): sum x^2 / sum y^2 = v + eps.
        close((x**2).sum(0) / (y**2).sum(0) - un.eps, var, atol=2e-6)
        close(y[0], y0)
        close(un.running_var, rv)
        assert x.grad is not None and un.weight.grad is not None
        close(x.grad[0], dx0)
        close(un.ema_gz, ema)
        close(un.weight.grad, dw)
        close(un.bias.grad, [2.0, 2.0])
    assert int(un.skip_counter) == 0


def test_spec_outlier_demo() -> None:
    un = UnifiedNorm(1, window_size=2, warmup_iters=3, outlier_filtration=True, dtype=F64).train()
    seen = []
    for x2 in [1.0, 1.1, 1.05, 100.0, 1.0]:
        x = torch.full((2, 1), math.sqrt(x2), dtype=F64)
        y = un(x)
        v = (x[0, 0] / y[0, 0]) ** 2 - un.eps
        seen.append((v.item(), un.buffer_x2.flatten().tolist(), un.running_var.item(), int(un.skip_counter)))
    expected = [  # t = 3, 4, 5 rows of TABLE
        (1.0747093, [1.1, 1.05], 1.0164709, 0),
        (100.0, [1.0164709, 1.05], 10.9148238, 1),
        (1.0082018, [1.0164709, 1.0], 9.9241616, 1),
    ]
    for (v, buf, rv, skips), (ev, ebuf, erv, eskips) in zip(seen[2:], expected):
        assert v == pytest.approx(ev, abs=1e-6)
        assert buf == pytest.approx(ebuf, abs=1e-6)
        assert rv == pytest.approx(erv, abs=1e-6)
        assert skips == eskips


class UNRecursion:
    """Float64 re-statement of the official UN1d step (forward, custom backward), one batch at a time."""

    def __init__(self, c: int, kf: int, kb: int, warmup: int, filt: bool, eps: float = 1e-5, mom: float = 0.9):
        self.kf, self.kb, self.warmup, self.filt, self.eps, self.mom = kf, kb, warmup, filt, eps, mom
        self.rv, self.ema = torch.ones(c, dtype=F64), torch.zeros(c, dtype=F64)
        self.bx, self.bg = torch.zeros(kf, c, dtype=F64), torch.zeros(kb, c, dtype=F64)
        self.t, self.skips = 0, 0

    def step(self, x: Tensor, mask: Tensor | None, dy: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, ...]:
        self.t += 1
        t, k = self.t, self.kf
        rows = x.reshape(-1, x.shape[-1])
        valid = rows if mask is None else rows[mask.reshape(-1)]
        x2 = (valid**2).sum(0) / valid.shape[0]
        roots = self.bx.sqrt().flatten()
        rho = roots.var()  # unbiased, all k*C entries pooled
        self.bx[t % k] = x2
        skip = k <= 1
        if t >= self.warmup and self.filt:
            am, gm = self.bx.mean(0), self.bx.log().mean(0).exp()
            if ((am - gm) > rho * k).any():
                self.bx[t % k] = self.rv
                skip = True
                self.skips += 1
        v = x2 if (t <= k or t < self.warmup or skip) else self.bx.log().mean(0).exp()
        r = torch.sqrt(v + self.eps) / torch.sqrt(self.rv + self.eps)
        r = torch.ones_like(r) if (t <= max(1000, self.warmup) or skip) else r.clamp(0.2, 5.0)
        z = x / torch.sqrt(v + self.eps)
        y = w * z + b
        self.rv = self.mom * self.rv + (1 - self.mom) * v
        # backward
        g = dy * w * r
        gz = (g * z).reshape(-1, x.shape[-1]).mean(0)
        self.bg[t % self.kb] = self.ema if skip else gz
        m = gz if (t <= self.kb or t < self.warmup or skip) else self.bg.mean(0)
        self.ema = self.mom * self.ema + (1 - self.mom) * m
        gt = g - m * z if skip else g - self.ema * z
        dx = gt / torch.sqrt(v + self.eps)
        dw = (dy * r * z).reshape(-1, x.shape[-1]).sum(0)
        return y, dx, dw


@pytest.mark.parametrize(
    "kf,kb,warmup,filt,start",
    [(2, 2, 3, False, 0), (3, 2, 2, True, 0), (2, 3, 2, False, 1000), (1, 1, 0, False, 0), (2, 2, 0, True, 0)],
    ids=["table-settings", "filter", "clamped-ratio", "k=1", "filter-no-warmup"],
)
def test_custom_backward_matches_official_recursion(kf: int, kb: int, warmup: int, filt: bool, start: int) -> None:
    g = torch.Generator().manual_seed(3)
    c = 3
    un = UnifiedNorm(c, window_size=(kf, kb), warmup_iters=warmup, outlier_filtration=filt, dtype=F64).train()
    sim = UNRecursion(c, kf, kb, warmup, filt)
    with torch.no_grad():
        un.weight.copy_(torch.tensor([1.0, -0.5, 2.0]))
        un.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
        un.iters.fill_(start)  # start=1000: steps past max(1000, warmup) exercise the clamped ratio r
    sim.t = start
    for step in range(6):
        scale = 4.0 if step == 4 else 1.0  # one loud batch: r leaves [1/5, 5] unclamped or is clamped
        x = (torch.randn(2, 4, c, generator=g, dtype=F64) * scale).requires_grad_(True)
        mask = torch.ones(2, 4, dtype=torch.bool)
        mask[1, 4 - step % 3 :] = False
        dy = torch.randn(2, 4, c, generator=g, dtype=F64)
        un.zero_grad()
        y = un(x, mask=mask)
        y.backward(dy)
        ey, edx, edw = sim.step(x.detach(), mask, dy, un.weight.detach(), un.bias.detach())
        torch.testing.assert_close(y.detach(), ey, rtol=1e-12, atol=1e-12)
        assert x.grad is not None and un.weight.grad is not None
        torch.testing.assert_close(x.grad, edx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(un.weight.grad, edw, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(un.running_var, sim.rv, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(un.ema_gz, sim.ema, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(un.buffer_x2, sim.bx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(un.buffer_gz, sim.bg, rtol=1e-12, atol=1e-12)
        assert int(un.skip_counter) == sim.skips


def test_clamped_ratio_scales_weight_gradient() -> None:
    """Past max(1000, warmup) the weight gradient uses r*z with r = clamp(sigma_used / sigma_running, 1/5, 5)."""
    un = UnifiedNorm(1, window_size=2, warmup_iters=0, dtype=F64).train()
    with torch.no_grad():
        un.iters.fill_(2000)
        un.running_var.fill_(1e-4)  # sigma_running tiny -> ratio huge -> clamped to 5
    x = torch.tensor([[2.0], [-2.0]], dtype=F64)
    un.buffer_x2.fill_(4.0)
    y = un(x)
    y.sum().backward()
    z = x / math.sqrt(4.0 + 1e-5)
    assert un.weight.grad is not None
    torch.testing.assert_close(un.weight.grad, (5.0 * z).sum(0), rtol=1e-12, atol=1e-12)


def test_mask_excludes_padding_from_forward_statistics() -> None:
    un = UnifiedNorm(2, dtype=F64).train()
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]], dtype=F64)
    y = un(x, mask=torch.tensor([[True, True, False]]))
    x2 = torch.tensor([5.0, 10.0], dtype=F64)
    torch.testing.assert_close(y, x / torch.sqrt(x2 + 1e-5))
    torch.testing.assert_close(un.running_var, 0.9 + 0.1 * x2)


def test_iters_counts_train_forwards_and_restart_warmup() -> None:
    un = UnifiedNorm(2).train()
    for _ in range(3):
        un(torch.randn(4, 2))
    un.eval()(torch.randn(4, 2))
    assert int(un.iters) == 3
    un.restart_warmup()
    assert int(un.iters) == 0


def test_folded_affine_equals_eval_output() -> None:
    un = UnifiedNorm(4, window_size=2, warmup_iters=1, dtype=F64).train()
    for _ in range(3):
        un(torch.randn(3, 5, 4, dtype=F64) * 2)
    with torch.no_grad():
        un.weight.uniform_(-1, 1)
        un.bias.uniform_(-1, 1)
    with pytest.raises(RuntimeError, match="eval mode"):
        un.folded_affine()
    un.eval()
    fa = un.folded_affine()
    assert fa.keep is None
    x = torch.randn(3, 5, 4, dtype=F64)
    torch.testing.assert_close(un(x), x * fa.scale + fa.shift, rtol=1e-12, atol=1e-12)


def test_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"window_size .*got \(2, 0\)"):
        UnifiedNorm(4, window_size=(2, 0))
    with pytest.raises(ValueError, match=r"expected channel_dim=-1, got 1"):
        UnifiedNorm(4, channel_dim=1)
    with pytest.raises(ValueError, match=r"warmup_iters to be an int >= 0, got -1"):
        UnifiedNorm(4, warmup_iters=-1)
    un = UnifiedNorm(4)
    shape_msg = r"given num_features=4 .*expected input with shape \[\*, 4\], but got input of size \[2, 3, 5\]"
    with pytest.raises(ValueError, match=shape_msg):
        un(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"expected mask of size \[2, 3\].*got mask of size \[2, 4\]"):
        un(torch.randn(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected more than 1 valid \(unmasked\) value per channel .*got 1 valid"):
        un(torch.randn(2, 3, 4), mask=torch.tensor([[1, 0, 0], [0, 0, 0]]))
