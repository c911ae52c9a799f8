"""Suite validation by a table of validators: :data:`VALIDATORS` maps every top-level setting to a function that
returns a problem (a message naming the key, what was expected and what was received) or ``None``. Checks that
involve several settings, the model table and the arms follow; every problem is collected, none stops the others.
What only one task needs checked is asked of its class (:meth:`normlab.lab.tasks.Task.suite_problems`,
:meth:`~normlab.lab.tasks.Task.arm_problems`)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

from normlab.lab.claims import parse_claims
from normlab.lab.config import (
    ARM_TRAIN_KEYS,
    SCALE_KEYS,
    SCALES,
    SUITE_KEYS,
    TASKS,
    ArmConfig,
    SuiteConfig,
    resolve_schedule_refs,
)
from normlab.lab.schedule import SCHEDULE_KEYS, is_step_spec
from normlab.lab.tasks import Task, task_class

__all__ = ["VALIDATORS", "validate_suite_dict"]

Validator = Callable[[str, Any], "str | None"]
WARMUP_KEYS = ("steps", "eval_every")  # what a warmup_steps reference may name (SuiteConfig.warmup_schedule)


def _int_at_least(low: int) -> Validator:
    def check(key: str, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            return f"{key}: expected an int >= {low}, got {value!r}"
        return None

    return check


def _number_in(low: float, high: float, low_inclusive: bool) -> Validator:
    def check(key: str, value: Any) -> str | None:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and (value >= low if low_inclusive else value > low) and value <= high
        if not ok:
            return f"{key}: expected a number in {'[' if low_inclusive else '('}{low}, {high}], got {value!r}"
        return None

    return check


def _string(non_empty: bool) -> Validator:
    def check(key: str, value: Any) -> str | None:
        if not isinstance(value, str) or (non_empty and not value):
            return f"{key}: expected a {'non-empty ' if non_empty else ''}string, got {value!r}"
        return None

    return check


def _warmup(key: str, value: Any) -> str | None:
    if isinstance(value, str) and is_step_spec(value, WARMUP_KEYS):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return (
            f"{key}: expected an int >= 0 or a schedule reference ('0.1*steps'; keys {list(WARMUP_KEYS)}), "
            f"got {value!r}"
        )
    return None


def _task(key: str, value: Any) -> str | None:
    return None if value in TASKS else f"task: expected one of {TASKS}, got {value!r}"


def _betas(key: str, value: Any) -> str | None:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value)
    ):
        return f"betas: expected two numbers in [0, 1), got {value!r}"
    return None


def _seeds(key: str, value: Any) -> str | None:
    ints = isinstance(value, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
    if not ints or not value or len(set(value)) != len(value):
        return f"seeds: expected a non-empty list of distinct ints >= 0, got {value!r}"
    return None


def _diagnostics_at(key: str, value: Any) -> str | None:
    if not isinstance(value, list) or not all(is_step_spec(s) for s in value) or len(set(value)) != len(value):
        return (
            f"diagnostics_at: expected a list of distinct ints >= 0 or schedule references ('steps', "
            f"'0.5*steps'; keys {list(SCHEDULE_KEYS)}), got {value!r}"
        )
    return None


def _diagnostics(key: str, value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        return f"diagnostics: expected a list of metric names, got {value!r}"
    from normlab.diagnostics import METRICS

    unknown = [m for m in value if m not in METRICS]
    return f"diagnostics: unknown metric(s) {unknown}; available: {list(METRICS)}" if unknown else None


def _table(key: str, value: Any) -> str | None:
    return None if isinstance(value, dict) else f"{key}: expected a table, got {type(value).__name__}"


def _scale(key: str, value: Any) -> str | None:
    return None if value in SCALES else f"scale: expected one of {SCALES}, got {value!r}"


def _impl(key: str, value: Any) -> str | None:
    from normlab.kernels import IMPLS

    if value not in IMPLS:
        return f"{key}: expected one of {list(IMPLS)} (see normlab.kernels.use_impl), got {value!r}"
    return None


def _scales(key: str, value: Any) -> str | None:
    """The ``[scales.*]`` presets: names, keys and each setting's own validator (model keys are checked when a
    preset is applied, against the task's model config)."""
    if not isinstance(value, dict):
        return f"scales: expected a table of presets, got {type(value).__name__}"
    problems = []
    for name, preset in value.items():
        if name not in SCALES or name == "default":
            problems.append(f"scales.{name}: expected a preset named one of {[s for s in SCALES if s != 'default']} "
                            "('default' is the file as written)")
        elif not isinstance(preset, dict):
            problems.append(f"scales.{name}: expected a table, got {type(preset).__name__}")
        else:
            for k, v in preset.items():
                problem = VALIDATORS[k](k, v) if k in SCALE_KEYS else f"unknown key {k!r}; a preset sets {SCALE_KEYS}"
                if problem:
                    problems.append(f"scales.{name}: {problem}")
    return "; ".join(problems) or None


# One validator per top-level setting of SuiteConfig except ``arms`` (checked by _check_arm) and ``claims`` (checked
# against the arms by normlab.lab.claims.parse_claims); arms' training overrides (ARM_TRAIN_KEYS) use the same
# entries.
VALIDATORS: dict[str, Validator] = {
    "name": _string(non_empty=True),
    "description": _string(non_empty=False),
    "task": _task,
    "steps": _int_at_least(1),
    "batch_size": _int_at_least(1),
    "seq_len": _int_at_least(2),
    "lr": _number_in(0.0, math.inf, False),
    "warmup_steps": _warmup,
    "min_lr_ratio": _number_in(0.0, 1.0, True),
    "weight_decay": _number_in(0.0, math.inf, True),
    "grad_clip": _number_in(0.0, math.inf, True),
    "betas": _betas,
    "eval_every": _int_at_least(1),
    "eval_batches": _int_at_least(1),
    "eval_batch_size": _int_at_least(1),
    "seeds": _seeds,
    "diagnostics_at": _diagnostics_at,
    "diagnostics": _diagnostics,
    "divergence_factor": _number_in(1.0, math.inf, False),
    "val_fraction": _number_in(0.0, 1.0, False),
    "model": _table,
    "scales": _scales,
    "scale": _scale,
    "impl": _impl,
}


def _error_text(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def _model_problems(task: type[Task], merged: dict[str, Any]) -> tuple[Any, list[str]]:
    """Build the task's model config from ``merged``; return ``(config or None, problems)`` with every problem
    found: each of the task's independent keys is tried alone first, then the whole config without the bad ones."""
    model_cls = task.model_config_class()
    problems: list[str] = []
    bad: set[str] = set()
    for key in task.independent_model_keys:
        if key in merged:
            try:
                model_cls.from_dict({key: merged[key]})
            except (ValueError, TypeError, KeyError) as exc:
                problems.append(_error_text(exc))
                bad.add(key)
    try:
        model_cfg = model_cls.from_dict({k: v for k, v in merged.items() if k not in bad})
    except (ValueError, TypeError, KeyError) as exc:
        problems.append(_error_text(exc))
        return None, problems
    return (model_cfg if not problems else None), problems


def _check_settings(data: dict[str, Any]) -> tuple[SuiteConfig, list[str]]:
    """The suite's own settings, each by its validator, then the checks across settings and the model table."""
    problems: list[str] = []
    unknown = sorted(set(data) - set(SUITE_KEYS))
    if unknown:
        problems.append(f"unknown top-level key(s) {unknown}; known keys: {sorted(SUITE_KEYS)}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in VALIDATORS:
            problem = VALIDATORS[key](key, value)
            if problem:
                problems.append(problem)
            else:
                values[key] = copy.deepcopy(value)
    cfg = SuiteConfig(**values)
    task = task_class(cfg.task)
    model_fields = {f.name for f in dataclasses.fields(task.model_config_class())}
    bad_model = sorted(set(cfg.model) - model_fields)
    if bad_model:
        problems.append(f"model: unknown key(s) {bad_model} for task {cfg.task!r}; known: {sorted(model_fields)}")
        cfg.model = {k: v for k, v in cfg.model.items() if k in model_fields}
    problems += task.suite_problems(cfg)
    if cfg.warmup_of() > cfg.steps:
        problems.append(f"warmup_steps={_shown(cfg.warmup_steps, cfg.warmup_of())} exceeds steps={cfg.steps}")
    for step in cfg.diagnostic_steps():
        if step > cfg.steps:
            problems.append(f"diagnostics_at: step {step} is after the last step (steps={cfg.steps})")
    return cfg, problems


def _shown(value: int | str, resolved: int) -> str:
    """A setting as written, with what a schedule reference resolved to: ``30`` or ``'2*steps' (40)``."""
    return str(value) if isinstance(value, int) else f"{value!r} ({resolved})"


def _arm_name(i: int, raw: dict[str, Any], seen: set[str], problems: list[str]) -> str:
    name = raw.get("name")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
        problems.append(f"arms[{i}].name: expected a non-empty string of letters, digits, '-_.'; got {name!r}")
        name = f"#{i}"
    elif name in seen:
        problems.append(f"arms[{i}].name: duplicate arm name {name!r}")
    seen.add(name)
    return name


def _check_arm(cfg: SuiteConfig, i: int, raw: dict[str, Any], seen: set[str]) -> tuple[ArmConfig, bool, list[str]]:
    """One ``[[arms]]`` table: ``(arm, buildable, problems)``; ``buildable`` when its model config was built."""
    problems: list[str] = []
    name = _arm_name(i, raw, seen, problems)
    where = f"arms[{i}] ({name})"
    task = task_class(cfg.task)
    model_fields = {f.name for f in dataclasses.fields(task.model_config_class())}
    arm = ArmConfig(name=name)
    for key, value in raw.items():
        if key == "name":
            continue
        if key in ARM_TRAIN_KEYS:
            problem = VALIDATORS[key](key, value)
            if problem:
                problems.append(f"{where}: {problem}")
            else:
                arm.train[key] = copy.deepcopy(value)
        elif key in model_fields:
            arm.model[key] = copy.deepcopy(value)
        else:
            problems.append(
                f"{where}: unknown key {key!r}; an arm takes 'name', training overrides {list(ARM_TRAIN_KEYS)} "
                f"or {task.model_config_class().__name__} fields {sorted(model_fields)}"
            )
    merged, ref_problems = resolve_schedule_refs(cfg.arm_model(arm, resolve=False), cfg.arm_schedule(arm))
    problems += [f"{where}: {p}" for p in ref_problems]
    model_cfg, model_problems = _model_problems(task, merged)
    problems += [f"{where}: {p}" for p in model_problems]
    if model_cfg is not None:
        problems += [f"{where}: {p}" for p in task.arm_problems(cfg, model_cfg)]
    if "warmup_steps" in arm.train and cfg.warmup_of(arm.train["warmup_steps"]) > cfg.steps:  # the suite's own:
        warmup = _shown(arm.train["warmup_steps"], cfg.warmup_of(arm.train["warmup_steps"]))  # in settings, once
        problems.append(f"{where}: warmup_steps={warmup} exceeds steps={cfg.steps}")
    return arm, model_cfg is not None and not ref_problems, problems


def validate_suite_dict(
    data: dict[str, Any], origin: str = "suite"
) -> tuple[SuiteConfig, list[str], list[tuple[int, ArmConfig]]]:
    """Validate a TOML-shaped dict, collecting every problem instead of raising.

    Returns:
        ``(cfg, problems, buildable)``: the config as far as it could be built (invalid settings keep their
        defaults), the problems, and the arms whose model config was built (``--dry-run`` builds those), each with
        its index in ``data["arms"]``: an entry that is not a table is left out of ``cfg.arms``, so an arm's
        position there is not what the messages call ``arms[i]``.
    """
    if not isinstance(data, dict):
        return SuiteConfig(), [f"expected a table at the top level, got {type(data).__name__}"], []
    cfg, problems = _check_settings(data)
    raw_arms = data.get("arms", [])
    if not isinstance(raw_arms, list) or not raw_arms:
        problems.append(f"arms: expected a non-empty list of [[arms]] tables, got {raw_arms!r}")
        raw_arms = []
    seen: set[str] = set()
    buildable: list[tuple[int, ArmConfig]] = []
    for i, raw in enumerate(raw_arms):
        if not isinstance(raw, dict):
            problems.append(f"arms[{i}]: expected a table, got {type(raw).__name__}")
            continue
        arm, ok, arm_problems = _check_arm(cfg, i, raw, seen)
        problems += arm_problems
        if ok:
            buildable.append((i, arm))
        cfg.arms.append(arm)
    cfg.claims, claim_problems = parse_claims(data.get("claims"), cfg, task_class(cfg.task).claim_metrics(cfg))
    return cfg, problems + claim_problems, buildable
