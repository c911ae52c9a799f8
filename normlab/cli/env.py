"""``normlab env``: versions and hardware, for bug reports and result bundles (collected by :mod:`normlab._env`)."""

from __future__ import annotations

import argparse
import json

from normlab._env import collect_env, git_sha

__all__ = ["collect_env", "git_sha"]

NAME = "env"
HELP = "print versions (normlab, torch, Python), the git SHA of a checkout, and the CPU/GPU"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print as JSON")


def run(args: argparse.Namespace) -> int:
    info = collect_env()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k.ljust(width)}  {v if v is not None else '-'}")
    return 0
