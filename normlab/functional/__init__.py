"""Pure tensor ops of every norm (no state, no registry). The modules in :mod:`normlab.nn` call these.

Each norm's op is exported here by :mod:`normlab.nn` once it has registered the norms (the registry records every
norm's op); only the ops that belong to no norm are listed below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from normlab.functional.power_norm import group_scaling

# Extended with every registered norm's op when normlab.nn is imported (always, by the time `import normlab...`
# returns: the parent package imports normlab.nn).
__all__ = ["group_scaling"]

if TYPE_CHECKING:
    # The norm ops are added at import from the registry, which a type checker cannot follow.
    def __getattr__(name: str) -> Any: ...
