"""Which implementation normlab's norms run: the per-module ``impl`` and the :func:`use_impl` scope.

Precedence, highest first:

1. a module's own ``impl`` other than ``"auto"`` (``RMSNorm(768, impl="composite")``, or ``m.impl = "cpu"``);
2. the innermost enclosing :func:`use_impl` scope;
3. ``"auto"``: the fused kernel for the input's device when one is available, else the composite op.

The scope is a :class:`contextvars.ContextVar`, so it is local to the thread (and asyncio task) that entered it,
restored on exit even when the block raises, and invisible to other threads: nothing process-global changes, and
nothing is read from the environment. Eager modules read it in ``forward``. A graph traced by ``torch.compile`` cannot
read a context variable, so there a module whose ``impl`` is ``"auto"`` compiles to its ``normlab::`` custom op and the
op reads the scope when it runs (as ``torch.nn.attention.sdpa_kernel`` is honoured by the SDPA op when it runs):
``use_impl("composite")`` then runs the op's composite body, the same math in plain PyTorch ops. A module's own
``impl`` is an ordinary attribute, so a compiled graph is guarded on it and retraced when it changes.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Literal

__all__ = ["IMPLS", "Impl", "check_impl", "current_impl", "resolve_impl", "use_impl"]

Impl = Literal["auto", "composite", "cpu", "triton"]
IMPLS: tuple[str, ...] = ("auto", "composite", "cpu", "triton")

_SCOPE: contextvars.ContextVar[str] = contextvars.ContextVar("normlab_kernels_impl", default="auto")


def check_impl(impl: object, where: str) -> str:
    """``impl`` if it names an implementation, else a ``ValueError`` naming ``where``."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"{where}: expected impl in {IMPLS}, got impl={impl!r}")
    return impl


@contextlib.contextmanager
def use_impl(impl: Impl) -> Iterator[None]:
    """Run normlab's norms with ``impl`` inside the block (modules whose own ``impl`` is not ``"auto"`` excepted).

    ``"composite"``: the plain PyTorch ops of :mod:`normlab.functional` (the reference implementation);
    ``"cpu"``: the fused C++ kernels (an error if the input is not on the CPU or they are unavailable);
    ``"triton"``: the Triton kernels (an error unless the input is on a CUDA device and Triton is installed);
    ``"auto"``: the default choice, e.g. to undo an outer scope. Scopes nest; the innermost wins.

    Example:
        >>> import torch, normlab
        >>> with normlab.kernels.use_impl("composite"):
        ...     y = normlab.RMSNorm(8)(torch.randn(2, 8))
    """
    token = _SCOPE.set(check_impl(impl, "use_impl"))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def current_impl() -> str:
    """The implementation the innermost :func:`use_impl` scope selects (``"auto"`` outside any scope)."""
    return _SCOPE.get()


def resolve_impl(module_impl: str) -> str:
    """The implementation a module with ``impl=module_impl`` runs now (see the precedence in the module docstring).

    While ``torch.compile`` traces, an ``"auto"`` module stays ``"auto"``: its custom op reads the scope when it runs.
    """
    if module_impl != "auto":
        return module_impl
    import torch

    if torch.compiler.is_compiling():
        return "auto"
    return _SCOPE.get()
