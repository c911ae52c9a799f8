"""Test-wide settings: deterministic seeds, a single intra-op thread (tests run beside each other on 2 cores), and
the norms' implementation for the whole session.

``NORMLAB_TEST_IMPL=composite pytest`` runs every test inside ``normlab.kernels.use_impl("composite")``: the norms'
composite (reference) ops instead of the fused kernels that ``"auto"`` picks, so the suite passes on both (issue 13).
Modules built with their own ``impl`` (the contract suite's ``@cpu`` cases) keep it: it wins over the scope. The library
itself reads no environment variable; only this test harness does.
"""

from __future__ import annotations

import os

# Triton's interpreter (tests/kernels/test_triton.py runs the Triton kernels on CPU tensors with it) must be chosen
# before anything imports triton: triton.language's own @jit functions (tl.sum, ...) are defined at `import triton`,
# and torch imports triton on its own (torch.compile probes for it). TRITON_INTERPRET=0 in the environment keeps
# the compiled GPU path (test_triton then runs on a CUDA device).
os.environ.setdefault("TRITON_INTERPRET", "1")
from collections.abc import Iterator

import pytest
import torch

from normlab import registry
from normlab.kernels import IMPLS, use_impl
from tests._contract_cases import Case

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _session_impl() -> Iterator[None]:
    impl = os.environ.get("NORMLAB_TEST_IMPL", "auto")
    if impl not in IMPLS:
        raise pytest.UsageError(f"NORMLAB_TEST_IMPL: expected one of {IMPLS}, got {impl!r}")
    with use_impl(impl):  # type: ignore[arg-type]
        yield


@pytest.fixture
def composite_norms() -> Iterator[None]:
    """For tests whose claim is bit-for-bit equality with normlab's math, i.e. its composite ops (use it with
    ``pytestmark = pytest.mark.usefixtures("composite_norms")``): the fused kernels that ``"auto"`` picks agree with
    them to float32 rounding, not bitwise (tests/kernels states their tolerances)."""
    with use_impl("composite"):
        yield


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _test_local_norm(request: pytest.FixtureRequest) -> Iterator[None]:
    """A contract case of a test-local norm (``tests/_norms``) has that norm registered while it runs, and only then."""
    callspec = getattr(request.node, "callspec", None)
    case = callspec.params.get("case") if callspec is not None else None
    if isinstance(case, Case) and case.registration is not None:
        with registry.temporary(case.registration):
            yield
    else:
        yield


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(1)
