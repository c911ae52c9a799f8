"""Durable file writes shared by the data cache, the lab and the benchmarks.

One implementation of "complete or absent": :func:`atomic_write` writes through a uniquely named, fsynced temporary
file in the target's directory and then either replaces the target (``os.replace``: the last writer wins) or, with
``exclusive=True``, links it into place so that an existing file is never overwritten. Checkpoints, the rewrite of a
row log, ``env.json`` and the data cache all go through it. Appends (:func:`append_jsonl`) are flushed and fsynced
before they return, so a line that a reader sees survives a crash of the writer.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "append_jsonl",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "jsonl_text",
    "remove_temp_files",
    "temp_name_of",
]


def temp_name_of(path: Path, name: str) -> bool:
    """Whether the file name ``name`` is one of the temporary files :func:`atomic_write` makes for ``path``."""
    return name.startswith(path.name + ".") and name.endswith(".tmp")


def remove_temp_files(path: Path) -> int:
    """Delete the temporary files that writes of ``path`` killed half-way left next to it; returns how many.

    Only call it while no other process writes ``path`` (under the caller's lock): a live writer's temporary file
    would be removed under it.
    """
    removed = 0
    if path.parent.is_dir():
        for leftover in path.parent.iterdir():
            if temp_name_of(path, leftover.name):
                leftover.unlink(missing_ok=True)
                removed += 1
    return removed


def atomic_write(path: Path, write: Callable[[BinaryIO], object], *, exclusive: bool = False) -> None:
    """Write ``path`` by calling ``write(f)`` on a fresh, uniquely named temporary file in the same directory, which
    is fsynced and then put in place: readers never see half a file, and concurrent writers (the ranks of a
    ``torchrun`` job filling a cache) never share a temporary file.

    By default the temporary file replaces ``path`` (``os.replace``: the last writer wins). With ``exclusive=True`` it
    appears by one hard link, which raises ``FileExistsError`` if ``path`` exists, so nothing is ever overwritten; on a
    file system without hard links it falls back to check-then-rename, which is exclusive only under a caller's lock.
    The temporary file is removed in every case, also when ``write`` raises.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} exists and is never overwritten") from None
        except OSError:
            if path.exists():
                raise FileExistsError(f"{path} exists and is never overwritten") from None
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically; ``exclusive=True`` never overwrites (see :func:`atomic_write`)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data), exclusive=exclusive)


def atomic_write_json(path: Path, obj: Any, *, exclusive: bool = True) -> None:
    """Write ``obj`` as indented, key-sorted JSON (``default=str`` for paths and the like) to ``path`` atomically and,
    by default, exclusively: the form of every ``env.json`` (lab runs and benchmark bundles)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", exclusive=exclusive)


def jsonl_text(records: Iterable[Mapping[str, Any]]) -> str:
    """Records as JSON lines: keys sorted, standard JSON only (a NaN or infinity raises ``ValueError``: callers
    write non-finite numbers as ``null``)."""
    return "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in records)


def append_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Append ``records`` to the JSONL file ``path`` (created if missing) in one write, flushed and fsynced before
    this returns. A kill during the write can leave a torn last line, which readers skip."""
    text = jsonl_text(records)
    if not text:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
