"""Parity of the fused CPU kernels (``impl="cpu"``) with the float64 reference and with the composite ops.

Tolerances (``|a - ref| <= tol * |ref| + tol * max(max|ref|, 1)``: relative to the element and to the tensor's
scale):

* float32: outputs 1e-6, gradients 2e-6 (measured 2026-12-01 at C=256: <= 1.1e-7 for the kernels and the
  composite ops alike);
* float16 / bfloat16, against the float64 reference of the same upcast inputs and the same (representable)
  incoming gradient: the final rounding to the format dominates, so one unit of the format's relative precision,
  2^-11 / 2^-8, outputs and gradients (measured: <= 2.1e-4 / 1.8e-3, identical to the composite ops);
* kernel vs composite in the same dtype: the same tolerances.
"""

from __future__ import annotations

import pytest
import torch

from normlab.kernels import _build, ops
from tests.kernels._cases import CASE_IDS, CASES, Case, by_id, make_inputs, run, run_ref

FWD_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2**-11, torch.bfloat16: 2**-8}
BWD_TOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2**-11, torch.bfloat16: 2**-8}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _close(got: torch.Tensor | None, want: torch.Tensor | None, tol: float, what: str) -> None:
    assert got is not None and want is not None, what
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    want = want.double()
    # The scale floor of 1 covers exact zeros that a backend computes as rounding noise (a one-channel LayerNorm's
    # weight gradient is 0 in the kernel and ~1e-6 in torch's LayerNorm).
    scale = max(float(want.abs().max()) if want.numel() else 0.0, 1.0)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _compare(case: Case, x: torch.Tensor, got: tuple, want: tuple, fwd: float, bwd: float) -> None:
    (outs, grads), (routs, rgrads) = got, want
    assert len(outs) == len(routs)
    for i, (o, r) in enumerate(zip(outs, routs)):
        assert o.dtype == x.dtype, f"{case.id}: output {i} dtype {o.dtype}, expected the input's {x.dtype}"
        _close(o, r, fwd, f"{case.id} output {i}")
    for name, r in rgrads.items():
        _close(grads[name], r, bwd, f"{case.id} grad of {name}")


@pytest.mark.parametrize("c", [40, 256])  # 40: vector body plus a scalar tail; 256: whole vectors
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_matches_float64_reference(case_id: str, dtype: torch.dtype, c: int) -> None:
    case = by_id(case_id)
    x = (torch.randn(3, 5, c) * 2 + 0.5).to(dtype)
    p = make_inputs(case, x)
    got = run(case, x, p, "cpu")
    _compare(case, x, got, run_ref(case, x, p), FWD_TOL[dtype], BWD_TOL[dtype])
    for name, g in got[1].items():
        assert g is not None and g.dtype == (x if name == "x" else p[name]).dtype, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_matches_composite(case_id: str, dtype: torch.dtype) -> None:
    case = by_id(case_id)
    x = torch.randn(7, 96).to(dtype)
    p = make_inputs(case, x)
    _compare(case, x, run(case, x, p, "cpu"), run(case, x, p, "composite"), FWD_TOL[dtype], BWD_TOL[dtype])


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_non_contiguous_input(case_id: str) -> None:
    case = by_id(case_id)
    base = torch.randn(6, 4, 2 * 48)
    for x in (base.transpose(0, 1), base[..., ::2]):  # rows out of order; strided channels
        assert not x.is_contiguous()
        p = make_inputs(case, x)
        _compare(case, x, run(case, x, p, "cpu"), run(case, x.contiguous(), p, "composite"), 1e-6, 2e-6)


CHANNEL_FIRST = {
    "layer_norm": lambda x, impl: ops.layer_norm(x, 24, torch.ones(24), torch.zeros(24), channel_dim=1, impl=impl),
    "rms_norm": lambda x, impl: ops.rms_norm(x, 24, torch.full((24,), 2.0), channel_dim=1, impl=impl),
    "prms_norm": lambda x, impl: ops.rms_norm(x, 24, None, eps_inside=False, channel_dim=1, partial=5, impl=impl),
    "crms_norm": lambda x, impl: ops.crms_norm(x, 24, channel_dim=1, impl=impl),
    "scale_norm": lambda x, impl: ops.scale_norm(x, 24, torch.tensor([3.0]), channel_dim=1, impl=impl),
    "dyt": lambda x, impl: ops.dyt(x, 24, torch.tensor([0.7]), torch.ones(24), torch.ones(24), channel_dim=1,
                                   impl=impl),
}


@pytest.mark.parametrize("name", list(CHANNEL_FIRST))
def test_channel_first_layout(name: str) -> None:
    fn = CHANNEL_FIRST[name]
    x = torch.randn(2, 24, 5, 3)
    torch.testing.assert_close(fn(x, "cpu"), fn(x, "composite"), rtol=4e-6, atol=4e-6)
    xl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(fn(xl, "cpu"), fn(x, "composite"), rtol=4e-6, atol=4e-6)


def test_multi_dim_normalized_shape() -> None:
    x, w, b = torch.randn(3, 4, 6), torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(ops.layer_norm(x, (4, 6), w, b, impl="cpu"), ops.layer_norm(x, (4, 6), w, b,
                                                                                             impl="composite"))


@pytest.mark.parametrize("shape", [(0, 32), (2, 0, 32), (1, 32), (32,), (1, 1, 1)], ids=str)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_empty_and_single_row(case_id: str, shape: tuple[int, ...]) -> None:
    case = by_id(case_id)
    x = torch.randn(shape)
    p = make_inputs(case, x)
    # Against the float64 reference: with one channel, LayerNorm's weight gradient is exactly 0 (the kernel gives 0)
    # while torch's LayerNorm returns rounding noise of ~1e-5.
    got = run(case, x, p, "cpu")
    _compare(case, x, got, run_ref(case, x, p), 1e-6, 2e-6)
    if x.numel() == 0:
        for name, g in got[1].items():
            assert g is not None and not g.any(), f"{name}: the gradient of an empty batch must be zero"


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_nan_and_inf_propagate_like_composite(case_id: str) -> None:
    case = by_id(case_id)
    x = torch.randn(4, 40)
    x[0, 3], x[1, 7], x[2, 0] = float("nan"), float("inf"), -float("inf")
    p = make_inputs(case, x)
    if case.residual:
        p["residual"] = torch.zeros_like(x)
    (got, _), (want, _) = run(case, x, p, "cpu", grad=False), run(case, x, p, "composite", grad=False)
    for o, w in zip(got, want):
        assert torch.equal(o.isnan(), w.isnan()), f"{case_id}: NaN positions differ"
        assert torch.equal(o.isinf(), w.isinf()), f"{case_id}: inf positions differ"
        finite = w.isfinite()
        torch.testing.assert_close(o[finite], w[finite], rtol=4e-6, atol=4e-6)
        assert o[3].isfinite().all(), f"{case_id}: a clean row must stay finite"


@pytest.mark.parametrize("case_id", ["layer_norm", "rms_norm_outside_bias", "scale_norm", "dyt", "add_layer_norm"])
def test_parameter_gradients_do_not_depend_on_thread_count(case_id: str) -> None:
    case = by_id(case_id)
    x = torch.randn(333, 72)
    p = make_inputs(case, x)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(run(case, x, p, "cpu")[1])
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for name, g in runs[0].items():
            assert g is not None and torch.equal(g, other[name]), f"{case_id}: grad of {name} changed with threads"


def test_composite_impl_is_the_functional_op() -> None:
    from normlab import functional as F

    x, w = torch.randn(5, 16), torch.randn(16)
    assert torch.equal(ops.rms_norm(x, 16, w, impl="composite"), F.rms_norm(x, 16, w))
    assert torch.equal(ops.layer_norm(x, 16, w, impl="composite"), F.layer_norm(x, 16, w))


def test_errors_name_the_parameter() -> None:
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"rms_norm: expected impl in .*got impl='fast'"):
        ops.rms_norm(x, 16, impl="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"layer_norm: expected weight with 16 elements, got weight of size \[8\]"):
        ops.layer_norm(x, 16, torch.ones(8))
    with pytest.raises(ValueError, match=r"dyt: expected alpha with a one-element tensor, got alpha of size \[2\]"):
        ops.dyt(x, 16, torch.ones(2))
    with pytest.raises(ValueError, match=r"rms_norm: expected partial in \[1, num_features=16\], got partial=17"):
        ops.rms_norm(x, 16, partial=17)
    with pytest.raises(ValueError, match=r"add_rms_norm: expected residual of the input's size \[4, 16\]"):
        ops.add_rms_norm(x, torch.randn(4, 15), 16)
    with pytest.raises(ValueError, match=r"rms_norm: given num_features=8 .* got input of size \[4, 16\]"):
        ops.rms_norm(x, 8)
    with pytest.raises(TypeError, match=r"layer_norm: expected a floating-point input"):
        ops.layer_norm(torch.ones(4, 16, dtype=torch.long), 16)


def test_cpu_impl_is_available_here() -> None:
    # The test machines have a compiler: the fused kernels must build (a failed build is a failure, not a skip).
    status = _build.cpu_status()
    assert status.available, status.detail


def test_every_case_is_listed() -> None:
    assert len({c.id for c in CASES}) == len(CASES)
