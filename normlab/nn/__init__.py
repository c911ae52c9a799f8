"""Norm modules. Importing this package imports every module file in it, which registers each norm with
:mod:`normlab.registry`; the norm classes exported here, and their functional ops in :mod:`normlab.functional`,
are derived from those registrations. A new norm is a module file here with ``@register_norm``: nothing to list.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from normlab import functional as _functional
from normlab.nn.power_norm import GroupScaling
from normlab.nn.sigma_reparam import SigmaReparamLinear
from normlab.registry import NormSpec, norms_defined_in

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")



def _export(specs: list[NormSpec]) -> list[str]:
    """Put each norm's class into this namespace and its functional op into :mod:`normlab.functional`."""
    ops: dict[str, Any] = {}
    for spec in specs:
        globals()[spec.cls.__name__] = spec.cls
        fn = spec.functional
        if fn is None:
            continue
        name = getattr(fn, "__name__", None)
        if not isinstance(name, str) or ops.get(name, fn) is not fn:
            raise TypeError(f"normlab.nn: {spec.name}'s functional op {fn!r} needs a __name__ no other norm's op has")
        ops[name] = fn
    for name, fn in ops.items():
        setattr(_functional, name, fn)
    _functional.__all__ = sorted({*_functional.__all__, *ops})
    return sorted(s.cls.__name__ for s in specs)


# Modules of this package that are not norms are exported by hand; the norms are derived.
__all__ = ["GroupScaling", "SigmaReparamLinear"]
__all__ += _export(norms_defined_in(__name__))

if TYPE_CHECKING:
    # The norm classes come from the registry at import, which a type checker cannot follow: this tells it that
    # ``normlab.nn.RMSNorm`` and the like exist.
    def __getattr__(name: str) -> Any: ...
