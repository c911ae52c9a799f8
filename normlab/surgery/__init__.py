"""Model surgery: swap, fold, convert and sync norms (tensor-level functions plus module-level wrappers)."""

from __future__ import annotations

from normlab.surgery.sync import convert_sync_norms

__all__ = ["convert_sync_norms"]
