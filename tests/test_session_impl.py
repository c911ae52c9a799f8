"""``NORMLAB_TEST_IMPL`` puts the whole test session in a :func:`normlab.kernels.use_impl` scope (tests/conftest.py);
the suite is run once with the default and once with ``NORMLAB_TEST_IMPL=composite`` (issue 13)."""

from __future__ import annotations

import os

import torch

import normlab
from normlab.kernels import current_impl


def test_the_session_runs_in_the_scope_the_environment_names() -> None:
    impl = os.environ.get("NORMLAB_TEST_IMPL", "auto")
    assert current_impl() == impl
    y = normlab.RMSNorm(8)(torch.randn(2, 8, requires_grad=True))
    assert ("normlab" in type(y.grad_fn).__name__) == (impl != "composite")
