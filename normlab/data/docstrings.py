"""Docstrings of the Python standard library: English prose that is present on every machine with Python.

Module, class and function docstrings are read with :mod:`ast` (nothing is imported) from the stdlib ``*.py`` files
of :func:`~normlab.data.stdlib_files`, in that order. The split is by file, with the rule of
:func:`~normlab.data.load_stdlib_corpus` (a file is held out when the SHA-1 of its relative path falls below
``val_fraction``), so the held-out docstrings come from files no training docstring comes from.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from pathlib import Path

from normlab.data.text import _is_val, stdlib_files

__all__ = ["stdlib_docstrings"]


def _docstrings(source: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old files
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def stdlib_docstrings(
    split: str = "train",
    *,
    count: int = 1000,
    min_chars: int = 40,
    max_chars: int = 400,
    val_fraction: float = 0.1,
) -> list[str]:
    """Up to ``count`` stdlib docstrings of ``split`` (``"train"`` or ``"val"``), whitespace-collapsed, at least
    ``min_chars`` long, cut to their first ``max_chars`` characters, without duplicates.

    Raises:
        ValueError: a bad ``split`` or ``count``.

    Example:
        >>> docs = stdlib_docstrings("val", count=3)
        >>> len(docs), all(len(d) >= 40 for d in docs)
        (3, True)
    """
    if split not in ("train", "val"):
        raise ValueError(f"stdlib_docstrings: expected split 'train' or 'val', got {split!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"stdlib_docstrings: expected count to be an int >= 1, got {count!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    out: list[str] = []
    for rel in stdlib_files(root):
        if _is_val(rel, val_fraction) != (split == "val"):
            continue
        try:
            source = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for doc in _docstrings(source):
            text = " ".join(doc.split())[:max_chars]
            if len(text) >= min_chars and text not in seen:
                seen.add(text)
                out.append(text)
                if len(out) == count:
                    return out
    return out
