"""``normlab report RUN_DIR``: re-render a lab run's ``report.md`` / ``report.html`` from its files on disk."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "report"
HELP = "render report.md and a self-contained report.html of a lab run directory (purely from its files)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by `normlab lab`")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")


def run(args: argparse.Namespace) -> int:
    from normlab.cli.lab import finish_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "env.json").is_file():
        print(f"normlab report: {run_dir} is not a lab run directory (no env.json)", file=sys.stderr)
        return 2
    return finish_report(run_dir, plots=not args.no_plots)
