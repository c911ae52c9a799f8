"""``normlab lab``: run a suite of small experiments on real offline data, then write and print the report.

Also works unchanged under ``torchrun --nproc_per_node=N -m normlab lab ...`` (DDP; rank 0 writes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

NAME = "lab"
HELP = "run a suite of experiments (default: the 'default' suite) into runs/<suite>-<time>/ and render its report"

_EXAMPLES = """examples:
  normlab lab                              the default suite (LayerNorm/RMSNorm/DyT/BatchNorm/... byte-level LMs)
  normlab lab --list                       packaged suites
  normlab lab --suite placement --dry-run  validate a suite against the registry and config schema, run nothing
  normlab lab --scale smoke                the same comparison in miniature (under a minute); --scale paper: larger
  normlab lab --suite my.toml --steps 50 --seeds 0 --set model.d_model=64
  normlab lab --resume runs/default-20250101-120000   finish a run that was interrupted
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = _EXAMPLES
    p.add_argument("--suite", default=None, help="packaged suite name or a TOML file (default: 'default')")
    p.add_argument("--list", action="store_true", help="list the packaged suites and exit")
    p.add_argument("--dry-run", action="store_true", help="validate the suite (every problem at once) and exit")
    p.add_argument("--scale", default=None, choices=("smoke", "default", "paper"),
                   help="size preset of the suite: smoke (under a minute, what the tests run), default (the suite as "
                        "written), paper (closer to the papers' settings; for a GPU or torchrun). Overrides apply "
                        "on top")
    p.add_argument("--out", default=None, help="run directory (must not exist or be empty)")
    p.add_argument("--runs-dir", default="runs", help="parent of new run directories (default: runs)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--steps", type=int, default=None, help="override the suite's steps")
    p.add_argument("--seeds", default=None, help="override the seeds, comma-separated (e.g. 0,1,2)")
    p.add_argument("--arms", default=None, help="only these arms, comma-separated")
    p.add_argument("--batch-size", type=int, default=None, help="override the suite's batch_size")
    p.add_argument("--lr", type=float, default=None, help="override the suite's lr")
    p.add_argument("--eval-every", type=int, default=None, help="override the suite's eval_every")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any suite key (TOML value; dotted for tables: model.d_model=64); repeatable")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); 1 is much faster on a machine shared with "
                        "other jobs")
    p.add_argument("--no-report", action="store_true", help="do not render the report at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _parse_value(text: str) -> Any:
    from normlab.lab.config import toml_loads  # tomllib, or tomli on Python 3.10

    try:
        return toml_loads(f"v = {text}")["v"]
    except ValueError:
        return text  # a bare string


def overrides_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], list[str] | None]:
    """CLI overrides as dotted keys, and the arm filter."""
    out: dict[str, Any] = {}
    for key in ("steps", "batch_size", "lr", "eval_every"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    if args.seeds is not None:
        try:
            out["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError as exc:
            raise ValueError(f"--seeds: expected comma-separated ints, got {args.seeds!r}") from exc
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    return out, arms


def _print_suites() -> None:
    from normlab.cli.ls import format_table
    from normlab.lab.config import list_suites

    rows = [["suite", "description"]] + [[k, v] for k, v in list_suites().items()]
    print(format_table(rows))


def finish_report(run_dir: Path, *, plots: bool = True) -> int:
    """Render the report of ``run_dir`` and print where it is and the summary table."""
    from normlab.lab.report import format_summary_table, render_report

    try:
        md = render_report(run_dir, plots=plots)
    except ImportError as exc:  # matplotlib missing: tables only
        print(f"normlab: {exc}; writing the report without plots", file=sys.stderr)
        md = render_report(run_dir, plots=False)
    print(f"run dir: {run_dir}")
    print(f"report:  {md}  ({md.with_suffix('.html')})")
    print()
    print(format_summary_table(run_dir))
    return 0


def _dry_run(args: argparse.Namespace, overrides: dict[str, Any], arms: list[str] | None) -> int:
    """Validate the suite with every check at once; print all problems (exit 2) or a one-line summary (exit 0)."""
    from normlab.lab.config import SuiteError, read_suite_dict
    from normlab.lab.validate import dry_run_problems

    try:
        data, origin = read_suite_dict(args.suite or "default")
    except (SuiteError, FileNotFoundError) as exc:
        print(f"normlab lab: {exc}", file=sys.stderr)
        return 2
    cfg, problems = dry_run_problems(data, origin, overrides, arms, scale=args.scale or "default")
    if problems:
        print(str(SuiteError(problems, origin)), file=sys.stderr)
        return 2
    runs = len(cfg.arms) * len(cfg.seeds)
    print(f"suite {cfg.name!r} (scale {cfg.scale}) is valid: {len(cfg.arms)} arms x {len(cfg.seeds)} seeds = {runs} "
          f"runs of {cfg.steps} steps ({', '.join(a.name for a in cfg.arms)}); {len(cfg.claims)} claims")
    return 0


def _fail(message: str) -> int:
    print(f"normlab lab: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from normlab.lab.config import SuiteError, load_suite
    from normlab.lab.dist import broadcast_object, init_distributed, shutdown
    from normlab.lab.rundir import (
        NotARunDir,
        RunDirLocked,
        RunDirNotEmpty,
        is_unused_run_dir,
        load_run_config,
        new_run_dir,
    )
    from normlab.lab.runner import run_suite
    from normlab.lab.validate import check_requirements

    if args.list:
        _print_suites()
        return 0
    try:
        overrides, arms = overrides_from_args(args)
        if args.resume:
            given = [flag for flag, v in (("--suite", args.suite), ("--out", args.out), ("--dry-run", args.dry_run),
                                          ("--scale", args.scale)) if v]
            if given or overrides or arms:
                raise ValueError(f"--resume takes the config stored in the run directory; drop {given or 'overrides'}")
        elif args.dry_run:
            return _dry_run(args, overrides, arms)
        if args.resume:
            run_dir: Path | None = Path(args.resume)
            cfg = load_run_config(Path(args.resume))
        else:
            cfg = load_suite(args.suite or "default", overrides, arms, scale=args.scale or "default")
    except (SuiteError, ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    missing = check_requirements(cfg.task)
    if missing:  # before any run directory exists
        return _fail("; ".join(missing))
    if not args.resume:
        run_dir = Path(args.out) if args.out else None
        if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
            return _fail(f"--out {run_dir} exists and is not a directory; pick a directory path")
        if run_dir is not None and not is_unused_run_dir(run_dir):  # a failed start's .lock alone does not count
            return _fail(f"--out {run_dir} exists and is not empty; pick another or --resume it")
    if args.threads is not None:
        if args.threads < 1:
            return _fail(f"--threads expects an int >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    dist = init_distributed()
    try:
        if run_dir is None and dist.is_main:
            run_dir = new_run_dir(cfg.name, args.runs_dir)  # claimed (created) by rank 0 only
        run_dir = Path(broadcast_object(str(run_dir), dist))
        result = run_suite(cfg, run_dir, argv=getattr(args, "argv", None) or ["normlab", *sys.argv[1:]],
                           resume=bool(args.resume), progress=not args.no_progress, dist=dist)
    except (RunDirLocked, RunDirNotEmpty, NotARunDir) as exc:  # only the run directory's state: a file missing
        return _fail(str(exc))  # during training is a bug or a broken install and keeps its traceback
    finally:
        shutdown(dist)
    if not dist.is_main:
        return 0
    if not args.no_report:
        finish_report(run_dir)
    else:
        print(f"run dir: {run_dir}")
    errors = sorted(f"{a}/seed{s}" for (a, s), st in result.statuses.items() if st == "error")
    if errors:
        print(f"\n{len(errors)} run(s) failed with an error: {', '.join(errors)} (see the report)", file=sys.stderr)
        return 1
    return 0
