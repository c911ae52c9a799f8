"""The fused batch-statistics kernels (``normlab::batch_norm_train``: BatchNorm and RepBN on token rows, with padding
masks) against the composite ops: outputs, gradients, running statistics, refusals and the distributed fallback.

Tolerances: float64 1e-12 (measured <= 7e-15), float32 2e-6 relative to the tensor's scale (the same reductions in
another order), bfloat16 / float16 one unit of the format's precision (the final rounding dominates).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.library import opcheck

from normlab.kernels import ops, use_impl
from tests.kernels._graph import kernel_ran

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}
C = 37  # a vector body plus a scalar tail


def _run(impl: str, x: torch.Tensor, mask: torch.Tensor | None, rep: bool, training: bool = True,
         momentum: float | None = 0.1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(outputs and buffers, gradients of x, weight, bias[, alpha]) of one call."""
    g = torch.Generator().manual_seed(3)
    dt = x.dtype
    w = (1 + 0.3 * torch.randn(C, generator=g)).to(dt).requires_grad_()
    b = (0.2 * torch.randn(C, generator=g)).to(dt).requires_grad_()
    rm, rv = torch.zeros(C, dtype=dt), torch.ones(C, dtype=dt)
    nbt = torch.zeros((), dtype=torch.long)
    xg = x.detach().clone().requires_grad_()
    common = dict(training=training, momentum=momentum, eps=1e-5, channel_dim=-1, mask=mask,
                  num_batches_tracked=nbt, impl=impl)
    if rep:
        alpha = torch.tensor([0.6], dtype=dt, requires_grad=True)
        y = ops.rep_batch_norm(xg, C, alpha, rm, rv, w, b, **common)  # type: ignore[arg-type]
        leaves = [xg, w, b, alpha]
    else:
        y = ops.batch_norm(xg, C, rm, rv, w, b, **common)  # type: ignore[arg-type]
        leaves = [xg, w, b]
    gy = torch.randn(y.shape, generator=g).to(dt)
    grads = torch.autograd.grad(y, leaves, gy)
    return [y, rm, rv, nbt], list(grads)


def _close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = a.detach(), b.detach()
        assert a.dtype == b.dtype and a.shape == b.shape, i
        scale = max(float(b.double().abs().max()), 1.0)
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale, msg=lambda m, i=i: f"{i}: {m}")


def _mask(b: int, n: int) -> torch.Tensor:
    m = torch.ones(b, n, dtype=torch.bool)
    m[0, n // 2:] = False
    m[-1, 1:] = False
    return m


@pytest.mark.parametrize("rep", [False, True], ids=["batch_norm", "rep_batch_norm"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_kernel_matches_composite(dtype: torch.dtype, masked: bool, rep: bool) -> None:
    x = (torch.randn(4, 9, C, dtype=torch.float64) * 2 + 3).to(dtype)  # an offset: mean subtraction matters
    mask = _mask(4, 9) if masked else None
    got, got_g = _run("cpu", x, mask, rep)
    want, want_g = _run("composite", x, mask, rep)
    _close(got, want, TOL[dtype])
    _close(list(got_g), list(want_g), TOL[dtype])


@pytest.mark.parametrize("rep", [False, True], ids=["batch_norm", "rep_batch_norm"])
def test_float64_gradcheck_with_mask(rep: bool) -> None:
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = _mask(2, 5)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if rep:
            return ops.rep_batch_norm(x, 6, a, None, None, w, b, True, mask=mask, impl="cpu")
        return ops.batch_norm(x, 6, None, None, w, b, True, channel_dim=-1, mask=mask, impl="cpu") + 0 * a

    assert torch.autograd.gradcheck(f, (x, w, b, a))


def test_cumulative_momentum_and_eval_without_buffers() -> None:
    x = torch.randn(3, 4, C, dtype=torch.float64)
    for momentum in (None, 0.3):
        got, _ = _run("cpu", x, _mask(3, 4), False, momentum=momentum)
        want, _ = _run("composite", x, _mask(3, 4), False, momentum=momentum)
        _close(got, want, 1e-12)
    # eval without running buffers normalises with the batch statistics (the kernel) and updates nothing
    y = ops.batch_norm(x, C, None, None, None, None, False, channel_dim=-1, impl="cpu")
    torch.testing.assert_close(y, ops.batch_norm(x, C, None, None, None, None, False, channel_dim=-1,
                                                 impl="composite"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [ops.batch_norm, ops.rep_batch_norm], ids=["batch_norm", "rep_batch_norm"])
def test_too_few_valid_rows_are_refused_as_in_the_composite_op(fn: Callable[..., torch.Tensor]) -> None:
    args: tuple[object, ...] = (torch.ones(1),) if fn is ops.rep_batch_norm else ()
    kw = dict(training=True, channel_dim=-1, impl="cpu")
    name = fn.__name__
    with pytest.raises(ValueError, match=rf"{name}: expected more than 1 value per channel when training"):
        fn(torch.randn(1, 1, C), C, *args, **kw)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match=rf"{name}: expected more than 1 valid \(unmasked\) value per channel"):
        fn(torch.randn(2, 3, C), C, *args, mask=mask, **kw)
    with pytest.raises(ValueError, match=rf"{name}: has no Triton kernel"):
        fn(torch.randn(2, 3, C), C, *args, training=True, channel_dim=-1, impl="triton")


def test_channel_first_running_stats_and_synced_ranks_run_the_composite_op(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 5, C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)
    assert kernel_ran(ops.batch_norm(x, C, rm, rv, training=True, channel_dim=-1))
    assert not kernel_ran(ops.batch_norm(x.transpose(1, 2), C, rm, rv, training=True, channel_dim=1))
    assert not kernel_ran(ops.batch_norm(x, C, rm, rv, training=False, channel_dim=-1))  # running statistics
    # A process group to sync over: the statistics need an all-reduce between their passes, done by the composite op
    # (tests/test_distributed.py runs it across processes).
    monkeypatch.setattr("normlab.kernels.ops.stats_group", lambda group, sync: object())
    assert not kernel_ran(ops.batch_norm(x, C, rm, rv, training=True, channel_dim=-1))
    assert kernel_ran(ops.batch_norm(x, C, None, None, training=False, channel_dim=-1))  # eval never syncs


def test_opcheck_and_compile() -> None:
    x = torch.randn(12, C, requires_grad=True)
    w, b = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
    mask = torch.rand(12) > 0.3
    mask[:2] = True
    for args in ((x, mask, w, b, torch.tensor([0.5], requires_grad=True), 1e-5), (x, None, None, None, None, 1e-5)):
        opcheck(torch.ops.normlab.batch_norm_train.default, args)
    torch._dynamo.reset()

    def f(x: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor) -> torch.Tensor:
        return ops.batch_norm(x, C, rm, rv, w, b, True, channel_dim=-1, impl="cpu")

    rm, rv, rm2, rv2 = torch.zeros(C), torch.ones(C), torch.zeros(C), torch.ones(C)
    y = torch.compile(f, fullgraph=True)(x.detach().reshape(3, 4, C), rm, rv)
    torch.testing.assert_close(y, f(x.detach().reshape(3, 4, C), rm2, rv2))
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


def _power_steps(impl: str, x: torch.Tensor, mask: torch.Tensor | None, groups: int | None,
                 divisor: str) -> list[torch.Tensor]:
    """Three training steps of PowerNorm (the warm-up step, then running statistics): outputs, gradients and the
    buffers (running_phi, ema_gz: the backward's recursion) after each."""
    c, dt = x.shape[-1], x.dtype
    w = torch.linspace(0.5, 1.5, c, dtype=dt).requires_grad_()
    b = torch.linspace(-1, 1, c, dtype=dt).requires_grad_()
    phi, ema, iters = torch.ones(c, dtype=dt), torch.full((c,), 0.1, dtype=dt), torch.zeros((), dtype=torch.long)
    xg = x.detach().clone().requires_grad_()
    out: list[torch.Tensor] = []
    for _ in range(3):
        y = ops.power_norm(xg, c, phi, ema, iters, w, b, True, warmup_iters=1, group_num=groups,
                           backward_divisor=divisor, mask=mask, impl=impl)  # type: ignore[arg-type]
        gy = torch.cos(torch.arange(y.numel(), dtype=torch.float64)).reshape(y.shape).to(dt)
        out += [y.detach(), *torch.autograd.grad(y, [xg, w, b], gy), phi.clone(), ema.clone()]
    return out


@pytest.mark.parametrize("divisor", ["batch", "forward"])
@pytest.mark.parametrize("groups", [1, 3, None], ids=["groups1", "groups3", "no_group_scaling"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_power_norm_kernel_matches_composite(dtype: torch.dtype, masked: bool, groups: int | None,
                                             divisor: str) -> None:
    x = (torch.randn(3, 7, 12, dtype=torch.float64) * 2 + 1).to(dtype)
    mask = _mask(3, 7) if masked else None
    _close(_power_steps("cpu", x, mask, groups, divisor), _power_steps("composite", x, mask, groups, divisor),
           TOL[dtype])


def test_power_norm_opcheck_and_eval_runs_the_composite_op() -> None:
    x = torch.randn(10, 8, requires_grad=True)
    mask = torch.rand(10) > 0.3
    opcheck(torch.ops.normlab.power_norm_stats.default, (x.detach(), mask, 2, 1e-5))  # a detached statistic
    inv = torch.rand(8) + 0.5
    w = torch.randn(8, requires_grad=True)
    opcheck(torch.ops.normlab.power_norm_apply.default, (x, inv, inv, w, None, torch.zeros(8), 0.9, 10.0, 2, 1e-5),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    phi, ema, iters = torch.ones(8), torch.zeros(8), torch.zeros((), dtype=torch.long)
    assert not kernel_ran(ops.power_norm(x, 8, phi, ema, iters, training=False, impl="cpu"))
    assert kernel_ran(ops.power_norm(x, 8, phi, ema, iters, training=True, impl="cpu"))
    with pytest.raises(ValueError, match=r"power_norm: expected more than 1 value per channel when training"):
        ops.power_norm(torch.randn(1, 8), 8, phi, ema, iters, training=True, impl="cpu")


def _unified_steps(impl: str, x: torch.Tensor, mask: torch.Tensor | None, warmup: int,
                   filtration: bool) -> list[torch.Tensor]:
    """Six training steps of UnifiedNorm (windows of 2: past the warm-up the geometric-mean statistic, the gradient
    window and the calibration ratio all take part): outputs, gradients and every buffer after each step."""
    c, dt = x.shape[-1], x.dtype
    w = torch.linspace(0.5, 1.5, c, dtype=dt).requires_grad_()
    b = torch.linspace(-1, 1, c, dtype=dt).requires_grad_()
    rv, bx, bg, ema = torch.ones(c, dtype=dt), torch.ones(2, c, dtype=dt), torch.zeros(2, c, dtype=dt), torch.zeros(
        c, dtype=dt)
    iters, skips = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)
    out: list[torch.Tensor] = []
    for step in range(6):
        xg = (x * (1 + 0.3 * step)).detach().requires_grad_()
        y = ops.unified_norm(xg, c, rv, bx, bg, ema, iters, skips, w, b, True, warmup_iters=warmup,
                             outlier_filtration=filtration, mask=mask, impl=impl)  # type: ignore[arg-type]
        gy = torch.cos(torch.arange(y.numel(), dtype=torch.float64)).reshape(y.shape).to(dt)
        out += [y.detach(), *torch.autograd.grad(y, [xg, w, b], gy), rv.clone(), bx.clone(), bg.clone(), ema.clone(),
                skips.clone()]
    return out


@pytest.mark.parametrize(("warmup", "filtration"), [(1, False), (3, True), (100, False)])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_unified_norm_kernel_matches_composite(dtype: torch.dtype, masked: bool, warmup: int,
                                               filtration: bool) -> None:
    x = (torch.randn(3, 7, 12, dtype=torch.float64) * 2 + 1).to(dtype)
    mask = _mask(3, 7) if masked else None
    _close(_unified_steps("cpu", x, mask, warmup, filtration), _unified_steps("composite", x, mask, warmup, filtration),
           TOL[dtype])


@pytest.mark.parametrize("scope", ["auto", "composite"])
def test_opcheck_every_batch_statistic_op_on_both_bodies(scope: str) -> None:
    """The ops' fused bodies (``auto``) and composite bodies (the ``composite`` scope, which a compiled graph's op
    reads when it runs; also what CUDA inputs and machines without a compiler run)."""
    x = torch.randn(12, C, requires_grad=True)
    w, b = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
    mask = torch.rand(12) > 0.3
    mask[:2] = True
    inv = torch.rand(C) + 0.5
    g = torch.randn(12, C)
    static = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    with use_impl(scope):  # type: ignore[arg-type]
        opcheck(torch.ops.normlab.batch_norm_train.default, (x, mask, w, b, torch.tensor([0.5], requires_grad=True),
                                                             1e-5))
        opcheck(torch.ops.normlab.batch_norm_train.default, (x, None, None, None, None, 1e-5))
        opcheck(torch.ops.normlab.power_norm_stats.default, (x.detach(), mask, 1, 1e-5))
        opcheck(torch.ops.normlab.power_norm_apply.default, (x, inv, inv, w, b, torch.zeros(C), 0.9, 12.0, 1, 1e-5),
                test_utils=static)
        opcheck(torch.ops.normlab.unified_norm_sums.default, (g, x.detach()))
        opcheck(torch.ops.normlab.unified_norm_dx.default, (g, x.detach(), inv, inv))
        opcheck(torch.ops.normlab.unified_norm_apply.default,
                (x, inv, torch.ones(C), w, b, torch.zeros(2, C), torch.zeros(C), 1, False, 0.9, 4000, 12.0),
                test_utils=static)


def test_results_do_not_depend_on_the_thread_count() -> None:
    """Fixed row blocks, summed in block order: bitwise the same with 1 and 2 threads (the kernels are built with
    OpenMP, so at::parallel_for really splits the work)."""
    x = torch.randn(8, 40, C) * 2 + 1
    mask = torch.rand(8, 40) > 0.2
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_run("cpu", x, mask, True)[0][:3] + list(_run("cpu", x, mask, True)[1]))
            results[-1] += _power_steps("cpu", x, mask, 1, "batch")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)
