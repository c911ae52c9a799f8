"""Test-wide settings: deterministic seeds, a single intra-op thread (tests run beside each other on 2 cores)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from normlab import registry
from tests._contract_cases import Case

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
