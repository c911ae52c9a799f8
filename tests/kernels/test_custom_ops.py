"""The ``normlab::`` custom ops as PyTorch 2 sees them: opcheck, ``torch.compile(fullgraph=True)``, ``torch.export``,
and the composite fallback a machine without a compiler runs."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from torch.library import opcheck

from normlab import kernels
from normlab.kernels import _build, ops
from tests.kernels._cases import CASE_IDS, by_id, make_inputs, run


def _t(*shape: int, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape).requires_grad_(grad)


def _forward_samples() -> list[tuple[str, tuple]]:
    x, w, b = _t(3, 5, 20), _t(20), _t(20)
    one = _t(1)
    return [
        ("rms_norm", (x, w, None, 1e-6, True, 20)),
        ("rms_norm", (x, w, b, 1e-8, False, 20)),
        ("rms_norm", (x, None, None, 1e-6, True, 20)),  # srms_norm
        ("rms_norm", (x, w, None, 1e-6, False, 3)),  # prms_norm
        ("crms_norm", (x, w, b, 1e-5)),
        ("scale_norm", (x, one, 1e-5)),
        ("layer_norm", (x, w, b, 1e-5)),
        ("layer_norm", (x, None, None, 1e-5)),
        ("dyt", (x, one, w, b)),
        ("dyt", (x, one, None, None)),
        ("add_rms_norm", (x, _t(3, 5, 20), w, None, 1e-6, True)),
        ("add_layer_norm", (x, _t(3, 5, 20), w, b, 1e-5)),
        ("rms_norm", (_t(0, 20), w, None, 1e-6, True, 20)),
        ("layer_norm", (_t(20, 7).t(), w, b, 1e-5)),  # non-contiguous input
    ]


@pytest.mark.parametrize("i", range(len(_forward_samples())))
def test_opcheck_forward_ops(i: int) -> None:
    name, args = _forward_samples()[i]
    opcheck(getattr(torch.ops.normlab, name).default, args)


def test_opcheck_backward_ops() -> None:
    x, g, w = torch.randn(4, 24), torch.randn(4, 24), torch.randn(24)
    one = torch.tensor([1.5])
    opcheck(torch.ops.normlab.rms_family_backward.default, (g, x, w, None, None, 1e-6, 0, 24, True, True, False))
    opcheck(torch.ops.normlab.rms_family_backward.default, (g, x, None, one, g, 1e-5, 3, 24, False, False, True))
    opcheck(torch.ops.normlab.layer_norm_backward.default, (g, x, w, None, 1e-5, True, True))
    opcheck(torch.ops.normlab.dyt_backward.default, (g, x, one, w, True, True, True))


@pytest.mark.slow
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_compile_fullgraph_matches_eager(case_id: str) -> None:
    torch._dynamo.reset()
    case = by_id(case_id)
    x = torch.randn(6, 48)
    p = make_inputs(case, x)

    def fn(x: torch.Tensor, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(o * 2 for o in case.call(x, p, "auto"))

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_case = type(case)(case.id, case.make, lambda x, p, impl: fn(x, p), case.ref, case.residual)
    compiled_case = type(case)(case.id, case.make, lambda x, p, impl: compiled(x, p), case.ref, case.residual)
    (eo, eg), (co, cg) = run(eager_case, x, p, "auto"), run(compiled_case, x, p, "auto")
    for a, b in zip(eo, co):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in eg:
        torch.testing.assert_close(eg[name], cg[name], rtol=0, atol=0)


@pytest.mark.slow
def test_compile_inductor_keeps_one_custom_op_node() -> None:
    torch._dynamo.reset()
    w = torch.randn(32)
    fn = torch.compile(lambda x: ops.rms_norm(x, 32, w).relu(), fullgraph=True)
    x = torch.randn(4, 32)
    torch.testing.assert_close(fn(x), ops.rms_norm(x, 32, w, impl="composite").relu())


class _Block(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(c))
        self.alpha = torch.nn.Parameter(torch.tensor([0.5]))
        self.lin = torch.nn.Linear(c, c)

    def forward(self, x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        y, h = ops.add_layer_norm(x, res, x.shape[-1], self.w)
        return ops.rms_norm(self.lin(y), x.shape[-1], self.w) + ops.dyt(h, x.shape[-1], self.alpha)


def test_export_keeps_the_custom_ops() -> None:
    m = _Block(16)
    x, res = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    ep = torch.export.export(m, (x, res))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"normlab.add_layer_norm.default", "normlab.rms_norm.default", "normlab.dyt.default"} <= targets, targets
    torch.testing.assert_close(ep.module()(x, res), m(x, res))


def test_torch_func_grad_through_the_ops() -> None:
    w = torch.randn(12)
    x = torch.randn(3, 12)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (ops.layer_norm(x, 12, w) * torch.arange(12.0)).sum()

    def loss_c(x: torch.Tensor) -> torch.Tensor:
        return (ops.layer_norm(x, 12, w, impl="composite") * torch.arange(12.0)).sum()

    torch.testing.assert_close(torch.func.grad(loss)(x), torch.func.grad(loss_c)(x), rtol=2e-6, atol=2e-6)
    batched = torch.func.vmap(lambda r: ops.rms_norm(r, 12, w))(x)
    torch.testing.assert_close(batched, ops.rms_norm(x, 12, w), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"layer_norm: impl='cpu' cannot run under torch.func transforms"):
        torch.func.grad(lambda x: ops.layer_norm(x, 12, w, impl="cpu").sum())(x)


@pytest.fixture
def no_cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as it would be on a machine without a compiler: the build raises."""

    def fail() -> _build.CpuKernelStatus:
        raise OSError("simulated: no C++ compiler")

    monkeypatch.setattr(_build, "_status", None)
    monkeypatch.setattr(_build, "_load", fail)


def test_without_a_compiler_warns_once_and_falls_back(no_cpu_kernels: None) -> None:
    with pytest.warns(RuntimeWarning, match=r"fused CPU kernels could not be built.*simulated: no C\+\+ compiler"):
        assert not _build.cpu_status().available
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _build.cpu_status().detail.startswith("unavailable (OSError: simulated")
        assert set(kernels.backends().values()) == {"composite"}
        ops.rms_norm(torch.randn(2, 8), 8)
    with pytest.raises(RuntimeError, match=r"rms_norm: impl='cpu' was requested but the fused CPU kernels are "):
        ops.rms_norm(torch.randn(2, 8), 8, impl="cpu")


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_fallback_bodies_match_the_composite_ops(no_cpu_kernels: None, case_id: str) -> None:
    # impl="auto" now runs the custom ops' composite bodies, including their closed-form backward formulas.
    case = by_id(case_id)
    x = torch.randn(2, 5, 40)
    p = make_inputs(case, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        (o, g), (co, cg) = run(case, x, p, "auto"), run(case, x, p, "composite")
    for a, b in zip(o, co):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for name in cg:
        torch.testing.assert_close(g[name], cg[name], rtol=2e-6, atol=2e-6)


def test_backends_report_the_fused_kernels() -> None:
    assert kernels.backends() == {name: "cpu" for name in kernels.OPS}
    on_cuda = "triton" if importlib.util.find_spec("triton") is not None else "composite"
    assert kernels.backends("cuda") == {name: "composite" if name in kernels.CPU_ONLY_OPS else on_cuda
                                        for name in kernels.OPS}
    assert {"batch_norm", "rep_batch_norm", "power_norm"} <= set(kernels.BATCH_OPS) <= set(kernels.CPU_ONLY_OPS)
    assert {"group_norm", "instance_norm"} <= set(kernels.CPU_ONLY_OPS) <= set(kernels.OPS)
    assert kernels.backends("mps") == {name: "composite" for name in kernels.OPS}
    assert kernels.backend_detail().startswith("fused C++ (")


def test_build_directory_is_keyed_by_torch_version_and_source(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    path = _build._build_dir("AVX2")
    assert path.parent == tmp_path / "kernels"
    assert path.name.startswith(f"torch{torch.__version__.replace('+', '_')}-AVX2-")
    assert _build._build_dir("AVX2") == path and _build._build_dir("AVX512") != path
