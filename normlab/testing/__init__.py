"""Float64 reference implementations and helpers shared by the tests and the benchmarks.

Each reference registers itself by norm name with :func:`register_reference`. Importing this package imports every
module file in it, so a reference in a new file here needs nothing else; :attr:`normlab.registry.NormSpec.reference`
imports the package on first use (:mod:`normlab.nn` never imports it).
"""

from __future__ import annotations

import importlib
import pkgutil

from normlab.registry import register_reference

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["register_reference"]
