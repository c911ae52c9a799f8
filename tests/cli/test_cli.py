"""The CLI skeleton: main(argv) -> int, ls, env, bare help, python -m normlab."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import normlab
from normlab.cli import main
from normlab.cli.env import git_sha
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


def test_ls_trait_columns_match_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:7] == ["name", "class", "layout", "running", "batch-dep", "foldable", "custom-bwd"]
    yn = {True: "yes", False: "-"}
    rows = {line.split()[0]: line.split()[:7] for line in lines[2:] if line.strip() and not line.endswith(" norms")}
    for spec in list_norms():
        traits = [spec.layout, *(yn[t] for t in (spec.has_running_stats, spec.batch_dependent, spec.foldable,
                                                 spec.custom_backward))]
        assert rows[spec.name][2:] == traits, f"{spec.name}: ls shows {rows[spec.name][2:]}, registry has {traits}"
    # Spot values that do not depend on reading the registry back.
    assert rows["batch_norm"][3:6] == ["yes", "yes", "yes"]
    assert rows["layer_norm"][3:7] == ["-", "-", "-", "-"]
    assert rows["power_norm"][6] == "yes"


SHA = re.compile(r"^[0-9a-f]{40}(-dirty)?$")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_sha_of_a_checkout(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)

    assert git_sha(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-q", "-m", "init")
    sha = git_sha(tmp_path)
    assert sha is not None and re.fullmatch(r"[0-9a-f]{40}", sha)
    (tmp_path / "f.txt").write_text("b")
    assert git_sha(tmp_path) == sha + "-dirty"


def test_env_reports_the_sha_of_this_checkout(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(normlab.__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("normlab is not imported from a git checkout")
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert SHA.match(info["git_sha"]), info["git_sha"]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    assert info["git_sha"].split("-")[0] == head.stdout.strip()
    assert main(["env"]) == 0
    assert re.search(r"^git_sha\s+[0-9a-f]{40}(-dirty)?$", capsys.readouterr().out, re.MULTILINE)


def test_env_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"].startswith("2.") and info["python"].count(".") == 2
    assert {"git_sha", "cpu", "cuda", "normlab"} <= set(info)
    # Which backend each kernel op runs (issue 13): "op=backend" for every op in normlab.kernels.OPS.
    assert info["kernel_backends_cpu"].split() == [f"{op}={b}" for op, b in normlab.kernels.backends("cpu").items()]


def test_unknown_subcommand_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_python_dash_m() -> None:
    out = subprocess.run([sys.executable, "-m", "normlab", "ls"], capture_output=True, text=True, check=True)
    assert "layer_norm" in out.stdout
