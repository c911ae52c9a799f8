"""Import an optional dependency in a test, failing (not skipping) with the extra that provides it.

``make test`` installs the ``dev``, ``hf``, ``plot`` and ``data`` extras, so a missing package there is a broken
environment that must show up as a failure; ``pytest.importorskip`` would hide it as a skip.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def require(module: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``, or ``pytest.fail`` naming the normlab extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(
            f"this test needs {module!r} from normlab's {extra!r} extra (pip install -e '.[{extra}]'; "
            f"`make test` installs it): {exc}",
            pytrace=False,
        )
