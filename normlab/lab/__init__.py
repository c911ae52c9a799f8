"""The lab: suites of small, honest experiments on real offline data, with resumable runs and reports.

>>> from normlab.lab import load_suite, run_suite, render_report  # doctest: +SKIP
>>> cfg = load_suite("default")  # doctest: +SKIP
>>> result = run_suite(cfg, "runs/default-demo")  # doctest: +SKIP
>>> render_report(result.run_dir)  # doctest: +SKIP
"""

from __future__ import annotations

from normlab.lab.config import ArmConfig, SuiteConfig, SuiteError, list_suites, load_suite, parse_suite
from normlab.lab.runner import RunResult, collect_hook, load_run_config, lr_at, new_run_dir, run_suite
from normlab.lab.schema import make_row, read_rows, row_key, validate_row

__all__ = [
    "ArmConfig",
    "RunResult",
    "SuiteConfig",
    "SuiteError",
    "collect_hook",
    "list_suites",
    "load_run_config",
    "load_suite",
    "lr_at",
    "make_row",
    "new_run_dir",
    "parse_suite",
    "read_rows",
    "row_key",
    "run_suite",
    "validate_row",
]
