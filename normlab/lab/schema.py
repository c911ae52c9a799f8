"""The result schema of a lab run and the append-only JSONL row log.

A run directory holds ``env.json`` (written once), ``rows.jsonl`` (one JSON object per line, long format) and, while
arms are unfinished, ``ckpt/``. A row is keyed by :func:`row_key` = ``(arm, seed, step, kind, metric, layer)``:

========  =====================================================================================================
kind      metrics
========  =====================================================================================================
train     ``train_loss`` (mean over the interval since the last eval), ``lr``, ``grad_norm`` (mean, before
          clipping), ``throughput`` (``unit`` = ``tokens/s`` or ``samples/s``, training time only)
eval      ``val_loss`` (and ``val_acc`` for classification), in eval mode (running statistics)
diag      per-layer diagnostics (``layer`` set), e.g. ``hidden_var``
health    failure diagnosis at every eval (:mod:`normlab.lab.health`): ``saturation:<norm>``, ``saturation_max``,
          ``frozen_fraction``, ``hidden_rms_max``, with extra fields naming the norm, block or parameters
status    ``metric = "status"``, ``status`` in ``ok | diverged | error`` and ``message``: the arm's last row
========  =====================================================================================================

Non-finite values are written as ``null`` (with ``"nonfinite": "nan" | "inf" | "-inf"``) so the file stays
standard JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from normlab._io import append_jsonl, atomic_write_text, jsonl_text

__all__ = [
    "KINDS",
    "ROWS_FILE",
    "SCHEMA_VERSION",
    "STATUSES",
    "RowLog",
    "make_row",
    "read_rows",
    "row_key",
    "rewrite_rows",
    "validate_row",
]

SCHEMA_VERSION = 1
ROWS_FILE = "rows.jsonl"
KINDS = ("train", "eval", "diag", "health", "status")
STATUSES = ("ok", "diverged", "error")
_REQUIRED = {"schema": int, "arm": str, "seed": int, "step": int, "kind": str, "metric": str}


def make_row(
    arm: str, seed: int, step: int, kind: str, metric: str, value: float | None = None, **extra: Any
) -> dict[str, Any]:
    """A row; a non-finite ``value`` becomes ``None`` with ``nonfinite`` recording which."""
    row: dict[str, Any] = {"schema": SCHEMA_VERSION, "arm": arm, "seed": seed, "step": step, "kind": kind,
                           "metric": metric, "layer": extra.pop("layer", None)}
    if value is not None:
        v = float(value)
        if math.isfinite(v):
            row["value"] = v
        else:
            row["value"] = None
            row["nonfinite"] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    else:
        row["value"] = None
    row.update(extra)
    return row


def validate_row(row: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the field when ``row`` does not follow the schema."""
    for key, typ in _REQUIRED.items():
        if key not in row:
            raise ValueError(f"row: missing field {key!r} in {row!r}")
        if not isinstance(row[key], typ) or isinstance(row[key], bool):
            raise ValueError(f"row: expected {key} to be {typ.__name__}, got {row[key]!r}")
    if row["kind"] not in KINDS:
        raise ValueError(f"row: expected kind in {KINDS}, got {row['kind']!r}")
    if row["kind"] == "status" and row.get("status") not in STATUSES:
        raise ValueError(f"row: expected status in {STATUSES} on a status row, got {row.get('status')!r}")
    if row.get("value") is not None and not isinstance(row["value"], (int, float)):
        raise ValueError(f"row: expected value to be a number or null, got {row['value']!r}")


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """The identity of a row: ``(arm, seed, step, kind, metric, layer)``; a finished run has each key once."""
    return (row["arm"], row["seed"], row["step"], row["kind"], row["metric"], row.get("layer"))


def read_rows(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Read a row log. A torn last line (a ``kill -9`` mid-write) is skipped; returns ``(rows, torn)``.

    Raises:
        ValueError: a line other than the last is not valid JSON (the file was damaged, not merely cut short).
    """
    if not path.exists():
        return [], False
    lines = path.read_bytes().split(b"\n")
    rows: list[dict[str, Any]] = []
    torn = False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:  # the last line has no newline yet: written partially
                torn = True
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({exc}); the row log is damaged") from exc
    return rows, torn


def rewrite_rows(path: Path, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Atomically rewrite ``path`` with the rows ``keep`` accepts (and without a torn last line).

    Used once when a run resumes, before anything is appended. Returns the number of rows dropped.
    """
    rows, torn = read_rows(path)
    kept = [r for r in rows if keep(r)]
    dropped = len(rows) - len(kept)
    if dropped == 0 and not torn:
        return 0
    atomic_write_text(path, jsonl_text(kept))
    return dropped


class RowLog:
    """Append-only JSONL writer: every :meth:`write` is flushed and fsynced before it returns.

    Args:
        path: the ``rows.jsonl`` file.
        enabled: ``False`` on DDP ranks other than 0 (they compute, rank 0 writes).
    """

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        for r in rows:
            validate_row(r)
        if not self.enabled or not rows:
            return
        append_jsonl(self.path, rows)
