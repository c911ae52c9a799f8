"""``normlab env``: versions and hardware, for bug reports and result bundles."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

NAME = "env"
HELP = "print versions (normlab, torch, Python), the git SHA of a checkout, and the CPU/GPU"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print as JSON")


def git_sha(path: Path | None = None) -> str | None:
    """The HEAD SHA of the checkout containing ``path`` (default: this package), or ``None``."""
    where = path or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    if out.returncode != 0 or not sha:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=5, check=False,
    ).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_env() -> dict[str, Any]:
    """Versions, git SHA and hardware as a dict (used by ``normlab env`` and every result bundle)."""
    import numpy
    import torch

    import normlab

    info: dict[str, Any] = {
        "normlab": normlab.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name in _OPTIONAL:
        version = _installed_version(name)
        if version is not None:
            info[name] = version
    return info


# Optional packages whose version changes lab results (digits data, plots): recorded when installed.
_OPTIONAL = ("scikit-learn", "matplotlib")


def _installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` from its metadata (nothing is imported), or ``None``."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run(args: argparse.Namespace) -> int:
    info = collect_env()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k.ljust(width)}  {v if v is not None else '-'}")
    return 0
