"""The fused GroupNorm / InstanceNorm kernels on token tensors (``normlab::group_norm``) against an independent float64
reference and the composite ops: outputs, gradients, running statistics, layouts, edge cases, determinism, and the
custom op as PyTorch 2 sees it.

Tolerances (``|a - ref| <= tol * |ref| + tol * max(max|ref|, 1)``) as in test_batch_ops.py: float64 1e-12, float32
2e-6 (the same sums in another order), bfloat16 / float16 one unit of the format's precision (the final rounding
dominates), outputs and gradients.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.library import opcheck

from normlab import GroupNorm, InstanceNorm
from normlab import functional as F
from normlab.kernels import _build, ops, use_impl
from tests.kernels._graph import kernel_ran

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}
C = 40  # a vector body plus a scalar tail; groups of 5 channels for 8 groups


def _gn_ref(x: torch.Tensor, groups: int, w: torch.Tensor | None, b: torch.Tensor | None,
            eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm of token tensors ``(B, *, C)`` from the paper's definition (Wu & He 2018, Eq. 1-2): per sample,
    statistics over each group's channels and all positions (biased variance)."""
    c = x.shape[-1]
    v = x.reshape(x.shape[0], -1, groups, c // groups)
    mean = v.mean((1, 3), keepdim=True)
    var = ((v - mean) ** 2).mean((1, 3), keepdim=True)
    y = ((v - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return y * (w if w is not None else 1) + (b if b is not None else 0)


def _params(c: int, dtype: torch.dtype, affine: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not affine:
        return None, None
    g = torch.Generator().manual_seed(3)
    return (1 + 0.4 * torch.randn(c, generator=g)).to(dtype), (0.3 * torch.randn(c, generator=g)).to(dtype)


def _call(kind: str, x: torch.Tensor, groups: int, w: torch.Tensor | None, b: torch.Tensor | None,
          impl: str) -> torch.Tensor:
    c = x.shape[-1]
    if kind == "instance_norm":
        return ops.instance_norm(x, c, weight=w, bias=b, channel_dim=-1, impl=impl)  # type: ignore[arg-type]
    return ops.group_norm(x, c, groups, w, b, channel_dim=-1, impl=impl)  # type: ignore[arg-type]


def _grads(kind: str, x: torch.Tensor, groups: int, affine: bool, impl: str,
           ref: bool = False) -> list[torch.Tensor]:
    """Output and gradients of x, weight, bias under a fixed random linear loss (gradients representable in x's dtype,
    so every backend and the float64 reference receive the same one)."""
    w, b = _params(x.shape[-1], x.dtype, affine)
    dt = torch.float64 if ref else x.dtype
    leaves = [t.detach().to(dt).requires_grad_() for t in (x, w, b) if t is not None]
    xg, wg, bg = (leaves + [None, None])[:3] if affine else (leaves[0], None, None)
    if ref:
        y = _gn_ref(xg, x.shape[-1] if kind == "instance_norm" else groups, wg, bg)
    else:
        y = _call(kind, xg, groups, wg, bg, impl)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(x.dtype).to(dt)
    return [y.detach(), *torch.autograd.grad(y, leaves, gy)]


def _close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, i
        scale = max(float(b.double().abs().max()) if b.numel() else 0.0, 1.0)
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale, msg=lambda m, i=i: f"{i}: {m}")


KINDS = [("group_norm", 8), ("group_norm", 1), ("group_norm", C), ("instance_norm", C)]
KIND_IDS = ["groups8", "groups1", "groups_c", "instance_norm"]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize(("kind", "groups"), KINDS, ids=KIND_IDS)
def test_matches_float64_reference_and_composite(kind: str, groups: int, dtype: torch.dtype, affine: bool) -> None:
    x = (torch.randn(3, 7, C, dtype=torch.float64) * 2 + 3).to(dtype)  # an offset: mean subtraction matters
    got = _grads(kind, x, groups, affine, "cpu")
    assert all(t.dtype == dtype for t in got), [t.dtype for t in got]
    _close(got, _grads(kind, x, groups, affine, "cpu", ref=True), TOL[dtype])
    _close(got, _grads(kind, x, groups, affine, "composite"), TOL[dtype])


@pytest.mark.parametrize("shape", [(2, 3, 4, C), (5, C), (1, C), (2, 300, C), (1, 2, 37)], ids=str)
def test_layouts_and_sizes(shape: tuple[int, ...]) -> None:
    """More positions (several row blocks per sample: 300 x 40 > one block), 2-D input (group norm over channels
    only), a single row, an image-shaped token tensor and a channel count with only a scalar tail."""
    x = torch.randn(shape, dtype=torch.float64) + 1
    groups = 1 if shape[-1] == 37 else 8
    for kind in ("group_norm", "instance_norm"):
        if kind == "instance_norm" and (len(shape) < 3 or x.numel() // (shape[0] * shape[-1]) < 2):
            continue
        got = _grads(kind, x, groups, True, "cpu")
        _close(got, _grads(kind, x, groups, True, "cpu", ref=True), 1e-12)


def test_non_contiguous_input() -> None:
    base = torch.randn(6, 4, 2 * C)
    w, b = _params(C, torch.float32)
    for x in (base.transpose(0, 1)[..., :C], base[..., ::2]):
        assert not x.is_contiguous()
        for kind in ("group_norm", "instance_norm"):
            torch.testing.assert_close(_call(kind, x, 8, w, b, "cpu"), _call(kind, x.contiguous(), 8, w, b,
                                                                              "composite"), rtol=2e-6, atol=2e-6)


def _instance_steps(impl: str, x: torch.Tensor, momentum: float) -> list[torch.Tensor]:
    """Two training steps of InstanceNorm with running buffers (outputs, gradients, buffers), then an eval step."""
    c = x.shape[-1]
    m = InstanceNorm(c, affine=True, track_running_stats=True, momentum=momentum, channel_dim=-1, impl=impl,  # type: ignore[arg-type]
                     dtype=x.dtype)
    out: list[torch.Tensor] = []
    for step in range(2):
        xg = (x * (1 + step)).detach().requires_grad_()
        y = m(xg)
        gy = torch.cos(torch.arange(y.numel(), dtype=torch.float64)).reshape(y.shape).to(x.dtype)
        out += [y.detach(), *torch.autograd.grad(y, [xg, m.weight, m.bias], gy), m.running_mean.clone(),
                m.running_var.clone()]
    out += [m.eval()(x).detach()]
    assert int(m.num_batches_tracked) == 0  # as torch.nn.InstanceNorm*d: its momentum is never cumulative
    return out


@pytest.mark.parametrize("momentum", [0.1, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_instance_norm_running_stats_are_updated_as_in_the_composite_op(dtype: torch.dtype, momentum: float) -> None:
    x = (torch.randn(4, 9, C, dtype=torch.float64) * 2 + 1).to(dtype)
    _close(_instance_steps("cpu", x, momentum), _instance_steps("composite", x, momentum), TOL[dtype])


def test_float64_gradcheck() -> None:
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.group_norm(x, 6, 3, w, b, channel_dim=-1, impl="cpu"),
                                    (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: ops.instance_norm(x, 6, None, None, w, b, channel_dim=-1,
                                                                      impl="cpu"), (x, w, b))


def test_what_runs_the_kernel() -> None:
    x = torch.randn(2, 5, 6, requires_grad=True)
    rm, rv = torch.zeros(6), torch.ones(6)
    assert kernel_ran(ops.group_norm(x, 6, 2, channel_dim=-1))
    assert kernel_ran(ops.instance_norm(x, 6, rm, rv, channel_dim=-1))
    assert kernel_ran(ops.group_norm(x, 6, 2, channel_dim=2))  # the last axis, named positively
    # channel-first inputs run torch's own fused group_norm (the composite op)
    assert not kernel_ran(ops.group_norm(x.transpose(1, 2), 6, 2, channel_dim=1, impl="cpu"))
    assert not kernel_ran(ops.instance_norm(x.transpose(1, 2), 6, channel_dim=1, impl="cpu"))
    # normalising with the running statistics is a per-channel affine: the composite op
    assert not kernel_ran(ops.instance_norm(x, 6, rm, rv, use_input_stats=False, channel_dim=-1, impl="cpu"))
    assert not kernel_ran(ops.group_norm(x, 6, 2, channel_dim=-1, impl="composite"))
    with use_impl("composite"):
        assert not kernel_ran(GroupNorm(6, num_groups=2, channel_dim=-1)(x))
        assert kernel_ran(GroupNorm(6, num_groups=2, channel_dim=-1, impl="cpu")(x))  # the module's impl wins
        assert kernel_ran(InstanceNorm(6, channel_dim=-1, impl="cpu")(x))


def test_the_modules_call_the_cpp_kernels_forward_and_backward(kernel_calls: list[str]) -> None:
    x = torch.randn(2, 5, 6, requires_grad=True)
    GroupNorm(6, num_groups=3, channel_dim=-1)(x).sum().backward()
    InstanceNorm(6, affine=True, track_running_stats=True, channel_dim=-1)(x).sum().backward()
    assert kernel_calls == ["gn_fwd", "gn_bwd", "gn_fwd", "gn_bwd"]


@pytest.mark.parametrize("shape", [(0, 4, 8), (2, 0, 8), (1, 1, 8), (0, 8)], ids=str)
def test_empty_and_single_position_inputs_behave_as_the_composite_op(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, requires_grad=True)
    y = ops.group_norm(x, 8, 2, channel_dim=-1, impl="cpu")
    want = F.group_norm(x.detach(), 8, 2, channel_dim=-1)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    if x.dim() == 3 and x.numel() > 0:  # one position: InstanceNorm refuses it, as the composite op does
        with pytest.raises(ValueError, match=r"instance_norm: expected more than 1 spatial element per channel"):
            ops.instance_norm(x, 8, channel_dim=-1, impl="cpu")


def test_nan_and_inf_propagate_like_composite() -> None:
    x = torch.randn(4, 6, C)
    x[0, 2, 3], x[1, 4, 17], x[2, 0, 0] = float("nan"), float("inf"), -float("inf")
    w, b = _params(C, torch.float32)
    for kind in ("group_norm", "instance_norm"):
        got, want = _call(kind, x, 8, w, b, "cpu"), _call(kind, x, 8, w, b, "composite")
        assert torch.equal(got.isnan(), want.isnan()), f"{kind}: NaN positions differ"
        assert torch.equal(got.isinf(), want.isinf()), f"{kind}: inf positions differ"
        torch.testing.assert_close(got[want.isfinite()], want[want.isfinite()], rtol=2e-6, atol=2e-6)
        assert got[3].isfinite().all(), f"{kind}: a clean sample must stay finite"


def test_results_do_not_depend_on_the_thread_count() -> None:
    """Fixed row blocks per sample, merged in block order: bitwise the same with 1, 2 and 3 threads."""
    x = torch.randn(3, 1000, 72) * 2 + 1
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_grads("group_norm", x, 8, True, "cpu") + _grads("instance_norm", x, 72, True, "cpu"))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_errors_name_the_parameter() -> None:
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"group_norm: expected weight with 8 elements, got weight of size \[4\]"):
        ops.group_norm(x, 8, 2, torch.ones(4), channel_dim=-1, impl="cpu")
    with pytest.raises(ValueError, match=r"instance_norm: expected running_mean with 8 elements, got running_mean of"):
        ops.instance_norm(x, 8, torch.zeros(3), torch.ones(3), channel_dim=-1, impl="cpu")
    with pytest.raises(ValueError, match=r"group_norm: has no Triton kernel; .*got 'triton'"):
        ops.group_norm(x, 8, 2, channel_dim=-1, impl="triton")
    with pytest.raises(ValueError, match=r"group_norm: given num_features=6 .* got input of size \[2, 3, 8\]"):
        ops.group_norm(x, 6, 2, channel_dim=-1, impl="cpu")
    with pytest.raises(RuntimeError, match=r"divisible by num_groups"):  # torch's error, as the composite op raises
        ops.group_norm(x, 8, 3, channel_dim=-1, impl="cpu")


@pytest.mark.parametrize("scope", ["auto", "composite"])
def test_opcheck_on_both_bodies(scope: str) -> None:
    """The op's fused body (``auto``) and its composite body (the ``composite`` scope, which a compiled graph's op reads
    when it runs; also what CUDA inputs and machines without a compiler run)."""
    x = torch.randn(3, 10, C, requires_grad=True)
    w, b = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
    g = torch.randn(3, 10, C)
    mean, var = torch.randn(3, 8), torch.rand(3, 8) + 0.5
    with use_impl(scope):  # type: ignore[arg-type]
        opcheck(torch.ops.normlab.group_norm.default, (x, w, b, 8, 1e-5))
        opcheck(torch.ops.normlab.group_norm.default, (x, None, None, C, 1e-5))
        opcheck(torch.ops.normlab.group_norm_backward.default, (g, x.detach(), mean, var, w.detach(), 8, 1e-5, True,
                                                                True))


def test_compile_fullgraph_updates_the_running_buffers() -> None:
    torch._dynamo.reset()
    w, b = torch.randn(C), torch.randn(C)

    def f(x: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor) -> torch.Tensor:
        return ops.instance_norm(x, C, rm, rv, w, b, channel_dim=-1, impl="cpu") + ops.group_norm(
            x, C, 8, w, b, channel_dim=-1, impl="cpu")

    x = torch.randn(3, 4, C)
    rm, rv, rm2, rv2 = torch.zeros(C), torch.ones(C), torch.zeros(C), torch.ones(C)
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, rm, rv)
    torch.testing.assert_close(y, f(x, rm2, rv2))
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


def test_fallback_body_without_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine without a compiler ``impl="auto"`` runs the op's composite body (its closed-form backward too)."""

    def fail() -> _build.CpuKernelStatus:
        raise OSError("simulated: no C++ compiler")

    monkeypatch.setattr(_build, "_status", None)
    monkeypatch.setattr(_build, "_load", fail)
    x = torch.randn(2, 9, C, dtype=torch.float64) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for kind, groups in KINDS:
            assert kernel_ran(_call(kind, x.requires_grad_(), groups, None, None, "auto"))
            _close(_grads(kind, x, groups, True, "auto"), _grads(kind, x, groups, True, "cpu", ref=True), 1e-12)
