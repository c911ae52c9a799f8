"""The ``normlab`` command line: ``main(argv) -> int``, one file per subcommand.

Each subcommand module exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

# Subcommand modules, in the order `normlab --help` lists them.
_SUBCOMMANDS = ("ls", "env", "lab", "report", "convert")

_EPILOG = """examples:
  normlab ls                      list every registered norm with its traits and paper
  normlab ls --foldable           only the norms that fold into a linear layer at inference
  normlab env                     versions of normlab, torch and Python, git SHA, CPU/GPU
  normlab lab                     run the default lab suite; writes runs/default-<time>/ with report.md/.html
  normlab lab --list              the packaged lab suites
  normlab report RUN_DIR          re-render a lab run's report from its files
  normlab convert DIR --to rms_norm --out OUT   exact Pre-LN -> Pre-RMSNorm of a Hugging Face model, verified
"""


def _modules() -> list[object]:
    return [importlib.import_module(f"normlab.cli.{name}") for name in _SUBCOMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab",
        description="normlab: normalization layers for PyTorch, their placements, surgery, diagnostics and a lab.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _modules():
        p = sub.add_parser(
            mod.NAME,  # type: ignore[attr-defined]
            help=mod.HELP,  # type: ignore[attr-defined]
            description=mod.HELP,  # type: ignore[attr-defined]
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)  # type: ignore[attr-defined]
        p.set_defaults(_run=mod.run)  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv_list)
    args.argv = ["normlab", *argv_list]  # the command line, recorded in lab runs' env.json
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    return int(args._run(args))
