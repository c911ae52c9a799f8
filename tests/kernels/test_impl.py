"""Choosing the implementation: a module's ``impl``, the :func:`normlab.kernels.use_impl` scope, and their precedence
(eager and under ``torch.compile``)."""

from __future__ import annotations

import threading

import pytest
import torch

import normlab
from normlab.kernels import current_impl, use_impl

TOKEN_NORMS = [normlab.LayerNorm, normlab.RMSNorm, normlab.SRMSNorm, normlab.PartialRMSNorm, normlab.CRMSNorm,
               normlab.ScaleNorm, normlab.DyT]


def _ran_custom_op(m: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``m(x)`` went through a ``normlab::`` custom op (its autograd node is the op's generated backward)."""
    y = m(x.requires_grad_(True))
    return "normlab" in type(y.grad_fn).__name__


@pytest.mark.parametrize("cls", TOKEN_NORMS, ids=lambda c: c.__name__)
def test_every_token_norm_takes_impl_and_shows_it_when_not_default(cls: type) -> None:
    x = torch.randn(2, 3, 8)
    assert "impl" not in repr(cls(8))
    assert "impl='composite'" in repr(cls(8, impl="composite"))
    assert _ran_custom_op(cls(8), x)
    assert not _ran_custom_op(cls(8, impl="composite"), x)
    assert _ran_custom_op(cls(8, impl="cpu"), x)
    m = cls(8)
    m.impl = "composite"  # an attribute: settable after construction, and then shown too
    assert "impl='composite'" in repr(m) and not _ran_custom_op(m, x)
    with pytest.raises(ValueError, match=r"expected impl in \('auto', 'composite', 'cpu', 'triton'\), got impl='fast'"):
        cls(8, impl="fast")


def test_scope_selects_and_module_impl_wins() -> None:
    x = torch.randn(4, 8)
    auto, pinned_cpu, pinned_composite = normlab.RMSNorm(8), normlab.RMSNorm(8, impl="cpu"), normlab.RMSNorm(
        8, impl="composite")
    with use_impl("composite"):
        assert current_impl() == "composite"
        assert not _ran_custom_op(auto, x)
        assert _ran_custom_op(pinned_cpu, x)  # the module's own impl wins over the scope
        with use_impl("auto"):  # an inner scope wins over the outer one
            assert _ran_custom_op(auto, x)
        assert not _ran_custom_op(auto, x)
    with use_impl("cpu"):
        assert _ran_custom_op(auto, x) and not _ran_custom_op(pinned_composite, x)
    assert current_impl() == "auto" and _ran_custom_op(auto, x)


def test_scope_is_restored_on_error_and_local_to_its_thread() -> None:
    with pytest.raises(RuntimeError, match="boom"), use_impl("composite"):
        raise RuntimeError("boom")
    assert current_impl() == "auto"
    seen: list[str] = []
    with use_impl("composite"):
        t = threading.Thread(target=lambda: seen.append(current_impl()))
        t.start()
        t.join()
    assert seen == ["auto"]  # another thread does not see this thread's scope
    with pytest.raises(ValueError, match=r"use_impl: expected impl in .*got impl='gpu'"), use_impl("gpu"):  # type: ignore[arg-type]
        pass


def test_module_impl_cpu_runs_the_kernel_backward_inside_a_composite_scope(kernel_calls: list[str]) -> None:
    m = normlab.LayerNorm(8, impl="cpu")
    x = torch.randn(4, 8, requires_grad=True)
    with use_impl("composite"):
        m(x).square().sum().backward()
    assert kernel_calls == ["ln_fwd", "ln_bwd"]


@pytest.mark.slow
def test_compiled_module_reads_the_scope_when_it_runs(kernel_calls: list[str]) -> None:
    """A compiled graph cannot read the scope, so its custom op does, at run time: no retrace, same result."""
    torch._dynamo.reset()
    m = normlab.RMSNorm(8)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(4, 8)
    y = compiled(x)
    assert kernel_calls == ["rms_fwd"]
    with use_impl("composite"):
        y_composite = compiled(x)
    assert kernel_calls == ["rms_fwd"]  # the composite body ran
    torch.testing.assert_close(y_composite, y, rtol=1e-6, atol=1e-6)
    m.impl = "composite"  # a module attribute: the graph is guarded on it and retraced without the custom op
    compiled(x)
    assert kernel_calls == ["rms_fwd"]
