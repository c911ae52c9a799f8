"""The kernel tests test the kernels: each starts in the default scope (``"auto"``: the fused kernels), whatever scope
the session runs in (``NORMLAB_TEST_IMPL``, tests/conftest.py); tests that need another backend ask for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from normlab.kernels import use_impl


@pytest.fixture(autouse=True)
def _kernel_tests_start_in_the_default_scope() -> Iterator[None]:
    with use_impl("auto"):
        yield
