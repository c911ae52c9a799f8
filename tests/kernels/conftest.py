"""The kernel tests test the kernels: each starts in the default scope (``"auto"``: the fused kernels), whatever scope
the session runs in (``NORMLAB_TEST_IMPL``, tests/conftest.py); tests that need another backend ask for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from normlab.kernels import _custom_ops, use_impl


@pytest.fixture(autouse=True)
def _kernel_tests_start_in_the_default_scope() -> Iterator[None]:
    with use_impl("auto"):
        yield


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the C++ extension functions the custom ops call (forward and backward)."""
    calls: list[str] = []
    real = _custom_ops.cpu_extension()
    assert real is not None

    class Spy:
        def __getattr__(self, name: str) -> Callable[..., Any]:
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(_custom_ops, "cpu_extension", lambda: Spy())
    return calls
