"""The CLI skeleton: main(argv) -> int, ls, env, bare help, python -m normlab."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from normlab.cli import main
from normlab.registry import list_norms


def test_bare_normlab_prints_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: normlab" in out and "examples:" in out and "normlab ls" in out


def test_ls_lists_every_norm_with_traits_and_paper(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for spec in list_norms():
        line = next(l for l in out.splitlines() if l.startswith(spec.name + " "))
        assert spec.cls.__name__ in line
        if spec.paper:
            assert spec.paper.url in line
    assert f"{len(list_norms())} norms" in out
    assert main(["ls", "--foldable"]) == 0
    out = capsys.readouterr().out
    assert "batch_norm" in out and "layer_norm " not in out


def test_env_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"].startswith("2.") and info["python"].count(".") == 2
    assert {"git_sha", "cpu", "cuda", "normlab"} <= set(info)


def test_unknown_subcommand_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_python_dash_m() -> None:
    out = subprocess.run([sys.executable, "-m", "normlab", "ls"], capture_output=True, text=True, check=True)
    assert "layer_norm" in out.stdout
