"""normlab: normalization layers for PyTorch, in one registry, with placements, surgery, diagnostics and a lab.

Public API::

    import normlab
    norm = normlab.create_norm("rms_norm", 768)
    [spec.name for spec in normlab.list_norms(foldable=True)]

Every registered norm's class is exported here under its class name (``normlab.RMSNorm``), derived from the
registry: a new norm is added by registering it, not by listing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from normlab import diagnostics, functional, models, nn, surgery, tta, weight
from normlab.registry import NormSpec, Paper, create_norm, get_norm, list_norms, register_norm
from normlab.registry import norms_defined_in as _norms_defined_in
from normlab.walk import iter_norms

__version__ = "0.1.0"

_NORMS = {spec.cls.__name__: spec.cls for spec in _norms_defined_in(nn.__name__)}
globals().update(_NORMS)

__all__ = [
    "NormSpec",
    "Paper",
    "__version__",
    "create_norm",
    "diagnostics",
    "functional",
    "get_norm",
    "iter_norms",
    "list_norms",
    "models",
    "nn",
    "register_norm",
    "surgery",
    "tta",
    "weight",
]
__all__ += sorted(_NORMS)

if TYPE_CHECKING:
    # The norm classes come from the registry at import, which a type checker cannot follow: this tells it that
    # ``normlab.RMSNorm`` and the like exist.
    def __getattr__(name: str) -> Any: ...
