"""The token ops' eager fast path (``_custom_ops._EagerOp``): bitwise the custom op's outputs and gradients, taken in
eager code only, and the custom op itself wherever a graph is traced."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from normlab.kernels import _custom_ops, ops, use_impl
from tests.kernels._graph import kernel_ran

Args = Callable[[torch.dtype, bool], tuple[Any, ...]]


def _t(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def _wb(c: int, dtype: torch.dtype, affine: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not affine:
        return None, None
    return (1 + 0.5 * torch.randn(c)).to(dtype), (0.3 * torch.randn(c)).to(dtype)


def _x(dtype: torch.dtype) -> torch.Tensor:
    return _t(3, 7, 40, dtype=dtype)


# Each op's full argument list but ``impl``: (name, args(dtype, affine)).
CASES: list[tuple[str, Args]] = [
    ("layer_norm", lambda dt, a: (_x(dt), *_wb(40, dt, a), 1e-5)),
    ("rms_norm", lambda dt, a: (_x(dt), *_wb(40, dt, a), 1e-6, True, 40)),
    ("rms_norm", lambda dt, a: (_x(dt), *_wb(40, dt, a), 1e-8, False, 40)),
    ("rms_norm", lambda dt, a: (_x(dt), *_wb(40, dt, a), 1e-6, True, 10)),  # pRMSNorm
    ("crms_norm", lambda dt, a: (_x(dt), *_wb(40, dt, a), 1e-5)),
    ("scale_norm", lambda dt, a: (_x(dt), torch.tensor([6.3]).to(dt), 1e-5)),
    ("dyt", lambda dt, a: (_x(dt), torch.tensor([0.7]).to(dt), *_wb(40, dt, a))),
    ("add_rms_norm", lambda dt, a: (_x(dt), _x(dt), *_wb(40, dt, a), 1e-6, True)),
    ("add_layer_norm", lambda dt, a: (_x(dt), _x(dt), *_wb(40, dt, a), 1e-5)),
    ("layer_norm", lambda dt, a: (_t(40, 9, dtype=dt).t(), *_wb(40, dt, a), 1e-5)),  # non-contiguous input
]


def _outputs_and_grads(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[list[torch.Tensor], ...]:
    args = tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
    out = fn(*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    gen = torch.Generator().manual_seed(5)
    grads_out = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    grads = torch.autograd.grad(outs, inputs, grads_out)
    return [o.detach() for o in outs], list(grads)


@pytest.fixture(params=["cpu", "composite-scope"])
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """The fused C++ kernels, or the ops' composite bodies (``impl="auto"`` in a ``use_impl("composite")`` scope)."""
    if request.param == "cpu":
        yield "cpu"
    else:
        with use_impl("composite"):
            yield "auto"


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{n}{i}" for i, (n, _) in enumerate(CASES)])
def test_eager_path_is_bitwise_the_custom_op(i: int, dtype: torch.dtype, affine: bool, impl: str) -> None:
    name, make = CASES[i]
    torch.manual_seed(i)
    args = (*make(dtype, affine), impl)
    (eo, eg), (co, cg) = (_outputs_and_grads(_custom_ops.TOKEN_OPS[name], args),
                          _outputs_and_grads(getattr(torch.ops.normlab, name), args))
    for a, b in zip(eo + eg, co + cg, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)
    with torch.no_grad():  # the forward alone (no autograd) is the op's body too
        out = _custom_ops.TOKEN_OPS[name](*args)
    assert torch.equal(out[0] if isinstance(out, tuple) else out, eo[0])


@pytest.fixture
def eager_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the token ops whose eager fast path ran (with or without autograd)."""
    calls: list[str] = []
    for name, op in _custom_ops.TOKEN_OPS.items():
        function, body = op.function, op.body

        class Spy:
            @staticmethod
            def apply(*args: Any, _n: str = name, _f: Any = function) -> Any:
                calls.append(_n)
                return _f.apply(*args)

        def spy_body(*args: Any, _n: str = name, _b: Callable[..., Any] = body) -> Any:
            calls.append(_n)
            return _b(*args)

        monkeypatch.setattr(op, "function", Spy)
        monkeypatch.setattr(op, "body", spy_body)
    return calls


class _Block(torch.nn.Module):
    """Every token op once, through the public ops."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(c))
        self.b = torch.nn.Parameter(torch.randn(c))
        self.alpha = torch.nn.Parameter(torch.tensor([0.5]))
        self.g = torch.nn.Parameter(torch.tensor([4.0]))

    def forward(self, x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        y, h = ops.add_layer_norm(x, res, c, self.w, self.b)
        z, h = ops.add_rms_norm(y, h, c, self.w)
        out = ops.layer_norm(z, c, self.w, self.b) + ops.rms_norm(h, c, self.w) + ops.crms_norm(h, c, self.w)
        return out + ops.scale_norm(h, c, self.g) + ops.dyt(h, c, self.alpha, self.w, self.b)


TOKEN_OPS = {"add_layer_norm", "add_rms_norm", "layer_norm", "rms_norm", "crms_norm", "scale_norm", "dyt"}


def test_eager_code_takes_the_fast_path(eager_calls: list[str]) -> None:
    m, x, res = _Block(16), torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 3, 16)
    m(x, res).sum().backward()
    assert set(eager_calls) == TOKEN_OPS
    y = ops.layer_norm(x, 16, m.w)
    assert type(y.grad_fn).__name__ == "EagerFor_normlab_layer_normBackward" and kernel_ran(y)
    eager_calls.clear()
    with torch.no_grad():
        m(x, res)
    assert set(eager_calls) == TOKEN_OPS
    eager_calls.clear()
    with use_impl("composite"):  # the composite functional ops: no kernel, no fast path
        y = m(x, res)
    assert eager_calls == [] and not kernel_ran(y)


def test_traced_code_calls_the_custom_ops(eager_calls: list[str]) -> None:
    torch._dynamo.reset()
    m, x, res = _Block(16), torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    targets: set[str] = set()

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        targets.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(m, fullgraph=True, backend=backend)
    xg = x.clone().requires_grad_(True)
    compiled(xg, res).sum().backward()
    assert {f"normlab.{name}" for name in TOKEN_OPS} <= targets, targets
    assert eager_calls == [] and xg.grad is not None
    ep = torch.export.export(m, (x, res))
    exported = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {f"normlab.{name}.default" for name in TOKEN_OPS} <= exported, exported
    assert eager_calls == []
    torch.testing.assert_close(ep.module()(x, res), m(x, res), rtol=0, atol=0)
    assert set(eager_calls) == TOKEN_OPS  # the eager call after the traced ones


def test_functorch_transforms_do_not_take_the_fast_path(eager_calls: list[str]) -> None:
    w = torch.randn(12)
    torch.func.grad(lambda x: ops.layer_norm(x, 12, w).sum())(torch.randn(3, 12))
    torch.func.vmap(lambda r: ops.rms_norm(r, 12, w))(torch.randn(3, 12))
    assert eager_calls == []


def test_double_backward_is_refused_as_by_the_custom_op() -> None:
    x, w = torch.randn(4, 12, requires_grad=True), torch.randn(12, requires_grad=True)
    for fn, op in ((ops.layer_norm, "layer_norm_backward"), (ops.rms_norm, "rms_family_backward")):
        (g,) = torch.autograd.grad(fn(x, 12, w).pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match=rf"backward through normlab\.{op}\.default but no autograd formula"):
            g.sum().backward()
    (g,) = torch.autograd.grad(ops.dyt(x, 12, torch.tensor([0.5]), w).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"backward through normlab\.dyt_backward\.default but no autograd formula"):
        g.sum().backward()
