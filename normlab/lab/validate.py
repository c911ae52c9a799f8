"""``normlab lab --dry-run``: check a suite against the config schema and the registry, build every arm's model and
run one tiny forward/backward, and check the task's optional dependencies, collecting every problem instead of
stopping at the first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from normlab._env import missing_requirements
from normlab.lab.config import ArmConfig, SuiteConfig, apply_scale, collect_overrides, validate_suite_dict
from normlab.lab.tasks import TASK_CLASSES, task_class

__all__ = ["check_requirements", "check_suite", "dry_run_problems"]


def check_requirements(task: str) -> list[str]:
    """Problems with the optional packages ``task`` needs (its data loader's list, :attr:`Task.requirements`), found
    without importing them: each names the ``pip install`` that fixes it."""
    cls = TASK_CLASSES.get(task)
    return [
        f"task {task!r} needs {r.distribution}, which is not installed: {r.install_hint}"
        for r in missing_requirements(cls.requirements if cls is not None else ())
    ]


def check_suite(cfg: SuiteConfig, arms: Sequence[tuple[int, ArmConfig]] | None = None) -> list[str]:
    """Problems found by building each arm's model and running a 2-sample forward/backward (empty: all good).

    Args:
        cfg: the suite.
        arms: ``(index, arm)`` pairs to build, the index being the arm's position in the suite's raw ``arms`` list,
            which error messages name (``buildable`` of :func:`~normlab.lab.config.validate_suite_dict`); default
            every arm of ``cfg`` at its position in ``cfg.arms`` (the same for a suite that parsed).
    """
    problems: list[str] = []
    task = task_class(cfg.task)
    for i, arm in enumerate(cfg.arms) if arms is None else arms:
        where = f"arms[{i}] ({arm.name})"
        try:
            model_cfg = task.model_config_class().from_dict(cfg.arm_model(arm))
            model = task.build(model_cfg)
            model(**task.smoke_batch(cfg, model_cfg)).loss.backward()
        except Exception as exc:  # every failure is a problem to report, whatever its type
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            problems.append(f"{where}: {type(exc).__name__}: {msg}")
    return problems


def dry_run_problems(
    data: dict[str, Any], origin: str, overrides: dict[str, Any] | None = None, arms: list[str] | None = None,
    scale: str = "default",
) -> tuple[SuiteConfig, list[str]]:
    """Everything ``--dry-run`` checks, all at once: the ``--scale`` preset, command-line overrides, the schema,
    the claims (arms and metrics they name) and the registry
    (:func:`~normlab.lab.config.validate_suite_dict`), a build and forward/backward of every arm whose model config
    was valid (:func:`check_suite`), and the task's optional packages (:func:`check_requirements`).

    Returns:
        ``(cfg, problems)``: the config as far as it could be built, and every problem (empty: valid).
    """
    data, problems = apply_scale(data, scale)
    data, override_problems = collect_overrides(data, overrides or {}, arms)
    problems = [f"command line: {p}" for p in problems + override_problems]
    cfg, schema_problems, buildable = validate_suite_dict(data, origin)
    problems += schema_problems
    problems += check_suite(cfg, buildable)
    problems += check_requirements(cfg.task)
    return cfg, problems
