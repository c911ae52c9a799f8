"""The architecture budget: no module over 500 lines and no function over 80 lines in ``normlab/``; and the lab
depends on no command-line module and on no other package's private module.

The size budget covers every module under ``COVERED`` (all of ``normlab/``). A function's length is counted as the
check below counts it: from its ``def`` line to its last line, decorators excluded, docstring and comments included.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COVERED = ("normlab",)
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def budget_problems(path: Path, source: str) -> list[str]:
    """Every module or function of ``source`` over the budget, as ``path: what (n lines)``."""
    problems = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        problems.append(f"{path}: module of {lines} lines (budget {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                problems.append(
                    f"{path}:{node.lineno}: function {node.name} of {n} lines (budget {MAX_FUNCTION_LINES})"
                )
    return problems


def _covered_files() -> list[Path]:
    files: list[Path] = []
    for entry in COVERED:
        path = ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_covered_modules_and_functions_fit_the_budget() -> None:
    files = _covered_files()
    assert len(files) > 10 and all(f.is_file() for f in files)
    problems = [p for f in files for p in budget_problems(f.relative_to(ROOT), f.read_text(encoding="utf-8"))]
    assert problems == []


def test_the_budget_check_finds_long_functions_and_modules() -> None:
    long_function = "def f():\n" + "    x = 1\n" * 80
    assert budget_problems(Path("m.py"), long_function) == ["m.py:1: function f of 81 lines (budget 80)"]
    assert budget_problems(Path("m.py"), "def f():\n" + "    x = 1\n" * 79) == []
    nested = "class A:\n    def g(self):\n" + "        x = 1\n" * 80
    found = [p.split(": ", 1)[1] for p in budget_problems(Path("m.py"), nested)]
    assert found == ["function g of 81 lines (budget 80)"]
    long_module = "x = 1\n" * 501
    assert budget_problems(Path("m.py"), long_module) == ["m.py: module of 501 lines (budget 500)"]


_IMPORT = re.compile(r"^\s*(?:from|import)\s+(normlab\.[\w.]+)", re.MULTILINE)


@pytest.mark.parametrize("path", sorted((ROOT / "normlab" / "lab").rglob("*.py")), ids=lambda p: p.name)
def test_the_lab_imports_no_cli_and_no_private_module_of_another_package(path: Path) -> None:
    """normlab.lab may import the top-level private helpers (normlab._io, normlab._env) and its own modules, but not
    normlab.cli or a private module of another package (normlab.data._cache)."""
    bad = [
        m for m in _IMPORT.findall(path.read_text(encoding="utf-8"))
        if m.startswith("normlab.cli") or (not m.startswith("normlab.lab") and re.search(r"\.\w+\._", m))
    ]
    assert bad == []
