"""Suite configuration: the :class:`SuiteConfig` / :class:`ArmConfig` dataclasses, TOML loading and validation.

A suite is a TOML file: top-level training settings, a ``[model]`` table (the base model configuration of every
arm) and ``[[arms]]`` tables. An arm has a ``name`` and overrides: keys in :data:`ARM_TRAIN_KEYS` override the
training settings, every other key overrides a field of the task's model config (``TransformerConfig`` for
``task = "lm_stdlib"``, ``CNNConfig`` for ``task = "digits"``). Each arm runs once per seed.

Norm keyword arguments may be tied to the training schedule (:data:`SCHEDULE_KEYS`): a string value of the form
``"<key>"`` or ``"<number>*<key>"`` in ``norm_kwargs`` (or in a ``norm_overrides`` slot's ``kwargs``) resolves to
``int(round(number * value))`` of that arm's schedule, e.g. ``warmup_iters = "warmup_steps"`` or
``total_steps = "0.75*steps"``. So ``--steps N`` keeps PowerNorm's warm-up tied to the LR warm-up and PRepBN's
LayerNorm -> RepBN ramp inside training. :meth:`SuiteConfig.arm_model` returns the resolved integers; the suite
(``to_dict``) keeps the references as written.

Validation reports every problem at once (:class:`SuiteError` carries the list), naming the key, what was expected
and what was received. Precedence is CLI > file > defaults: :func:`apply_overrides` edits the raw dict before
:func:`parse_suite` turns it into a :class:`SuiteConfig`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "ARM_TRAIN_KEYS",
    "SCHEDULE_KEYS",
    "TASKS",
    "ArmConfig",
    "SuiteConfig",
    "SuiteError",
    "apply_overrides",
    "collect_overrides",
    "list_suites",
    "model_config_class",
    "load_suite",
    "parse_suite",
    "read_suite_dict",
    "resolve_schedule_refs",
    "validate_suite_dict",
]

TASKS = ("lm_stdlib", "digits")
ARM_TRAIN_KEYS = ("lr", "batch_size", "warmup_steps", "weight_decay", "grad_clip")
# Integer schedule settings that norm kwargs may reference ("warmup_steps", "0.75*steps"); an arm's own
# warmup_steps override is the value its references see.
SCHEDULE_KEYS = ("steps", "warmup_steps", "eval_every")
_SCHEDULE_REF = re.compile(r"^\s*(?:(\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*$")


class SuiteError(ValueError):
    """A suite failed validation; ``problems`` lists every problem found (the message joins them)."""

    def __init__(self, problems: list[str], origin: str = "suite") -> None:
        self.problems = list(problems)
        self.origin = origin
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{origin}: {len(self.problems)} problem(s):\n{lines}")


@dataclass
class ArmConfig:
    """One arm: a name, model-config overrides and training overrides (keys of :data:`ARM_TRAIN_KEYS`)."""

    name: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The flat TOML form: ``{"name": ..., **train, **model}``."""
        return {"name": self.name, **self.train, **self.model}


@dataclass
class SuiteConfig:
    """A resolved suite. Every field has the default shown; a suite file sets what it needs.

    Args:
        name: suite name (used for the run directory).
        description: one line for ``normlab lab --list`` and the report.
        task: ``"lm_stdlib"`` (byte-level LM on the Python stdlib source) or ``"digits"`` (CNN on sklearn digits).
        steps: optimizer steps per arm and seed.
        batch_size: sequences (LM) or images (digits) per step and process.
        seq_len: LM window length in bytes.
        lr: peak learning rate of AdamW.
        warmup_steps: linear warmup from 0 to ``lr``; then cosine decay to ``min_lr_ratio * lr`` at ``steps``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        weight_decay: AdamW decoupled weight decay on matrices (not on norm parameters, biases or embeddings).
        grad_clip: max global gradient norm (0 disables clipping).
        betas: AdamW betas.
        eval_every: evaluate, write rows and checkpoint every this many steps (and at step 0 and the last step).
        eval_batches: LM validation batches of ``eval_batch_size`` fixed windows (digits evaluates the whole split).
        eval_batch_size: windows per validation batch.
        seeds: each arm runs once per seed (model init and data order).
        diagnostics_at: steps at which the diagnostics run on a fixed validation batch: ints or schedule references
            (``"steps"`` is the last step, ``"0.5*steps"`` the middle), so ``--steps`` moves them along.
        diagnostics: metric names of :func:`normlab.diagnostics.collect` recorded at ``diagnostics_at``.
        divergence_factor: an arm diverges when its training loss (any step) or validation loss (at an eval) is
            NaN/inf or exceeds this factor times its step-0 validation loss.
        val_fraction: share of the data held out for validation.
        model: base model configuration shared by every arm.
        arms: the arms.
    """

    name: str = "suite"
    description: str = ""
    task: str = "lm_stdlib"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eval_every: int = 50
    eval_batches: int = 4
    eval_batch_size: int = 32
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    diagnostics_at: list[int | str] = field(default_factory=list)
    diagnostics: list[str] = field(default_factory=lambda: ["hidden_variance", "angular_distance"])
    divergence_factor: float = 3.0
    val_fraction: float = 0.1
    model: dict[str, Any] = field(default_factory=dict)
    arms: list[ArmConfig] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The suite as a TOML-shaped dict (``arms`` flat); :func:`parse_suite` of it gives back an equal config."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "arms"}
        out["arms"] = [a.to_dict() for a in self.arms]
        return out

    def arm_train(self, arm: ArmConfig) -> dict[str, Any]:
        """The training settings of ``arm``: the suite's, with the arm's overrides."""
        base = {k: getattr(self, k) for k in ARM_TRAIN_KEYS}
        base.update(arm.train)
        return base

    def arm_schedule(self, arm: ArmConfig) -> dict[str, int]:
        """The integer schedule values (:data:`SCHEDULE_KEYS`) that ``arm``'s norm kwargs may reference."""
        return {"steps": self.steps, "warmup_steps": self.arm_train(arm)["warmup_steps"], "eval_every": self.eval_every}

    def arm_model(self, arm: ArmConfig, *, resolve: bool = True) -> dict[str, Any]:
        """The model configuration of ``arm``: the suite's ``model`` table with the arm's overrides (shallow), and,
        with ``resolve``, schedule references in norm kwargs replaced by integers (see the module docstring).

        Raises:
            ValueError: a schedule reference that does not resolve (:func:`parse_suite` reports these first).
        """
        merged = copy.deepcopy(self.model)
        merged.update(copy.deepcopy(arm.model))
        if self.task == "lm_stdlib":
            merged.setdefault("vocab_size", 256)
            merged.setdefault("max_seq_len", self.seq_len)
        if resolve:
            merged, problems = resolve_schedule_refs(merged, self.arm_schedule(arm))
            if problems:
                raise ValueError(f"arm {arm.name!r}: " + "; ".join(problems))
        return merged

    def diagnostic_steps(self) -> list[int]:
        """``diagnostics_at`` with schedule references (``"steps"``, ``"0.5*steps"``) resolved: sorted ints."""
        schedule = {"steps": self.steps, "warmup_steps": self.warmup_steps, "eval_every": self.eval_every}
        return sorted({_resolve_ref("diagnostics_at", s, schedule)[0] for s in self.diagnostics_at})

    def eval_steps(self) -> list[int]:
        """The steps with an evaluation and a checkpoint: 0, every ``eval_every``, and ``steps``."""
        return sorted({0, self.steps, *range(self.eval_every, self.steps + 1, self.eval_every)})


_FIELDS = {f.name: f for f in dataclasses.fields(SuiteConfig)}
_INT_MIN = {"steps": 1, "batch_size": 1, "seq_len": 2, "warmup_steps": 0, "eval_every": 1, "eval_batches": 1,
            "eval_batch_size": 1}
_FLOAT_RANGE = {  # name: (low, high, low_inclusive)
    "lr": (0.0, math.inf, False),
    "min_lr_ratio": (0.0, 1.0, True),
    "weight_decay": (0.0, math.inf, True),
    "grad_clip": (0.0, math.inf, True),
    "divergence_factor": (1.0, math.inf, False),
    "val_fraction": (0.0, 1.0, False),
}


def _is_step_spec(s: Any) -> bool:
    """An entry of ``diagnostics_at``: an int >= 0 or a schedule reference."""
    if isinstance(s, str):
        match = _SCHEDULE_REF.match(s)
        return match is not None and match.group(2) in SCHEDULE_KEYS
    return isinstance(s, int) and not isinstance(s, bool) and s >= 0


def _check_value(key: str, value: Any) -> str | None:
    """A problem with one training setting, or ``None``."""
    if key in _INT_MIN:
        if isinstance(value, bool) or not isinstance(value, int) or value < _INT_MIN[key]:
            return f"{key}: expected an int >= {_INT_MIN[key]}, got {value!r}"
    elif key in _FLOAT_RANGE:
        lo, hi, inclusive = _FLOAT_RANGE[key]
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and (value >= lo if inclusive else value > lo) and value <= hi
        if not ok:
            bracket = "[" if inclusive else "("
            return f"{key}: expected a number in {bracket}{lo}, {hi}], got {value!r}"
    elif key in ("name", "description"):
        if not isinstance(value, str) or (key == "name" and not value):
            return f"{key}: expected a {'non-empty ' if key == 'name' else ''}string, got {value!r}"
    elif key == "task":
        if value not in TASKS:
            return f"task: expected one of {TASKS}, got {value!r}"
    elif key == "betas":
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value)
        ):
            return f"betas: expected two numbers in [0, 1), got {value!r}"
    elif key == "seeds":
        ints = isinstance(value, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
        if not ints or not value or len(set(value)) != len(value):
            return f"seeds: expected a non-empty list of distinct ints >= 0, got {value!r}"
    elif key == "diagnostics_at":
        if not isinstance(value, list) or not all(_is_step_spec(s) for s in value) or len(set(value)) != len(value):
            return (
                f"diagnostics_at: expected a list of distinct ints >= 0 or schedule references ('steps', "
                f"'0.5*steps'; keys {list(SCHEDULE_KEYS)}), got {value!r}"
            )
    elif key == "diagnostics":
        if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
            return f"diagnostics: expected a list of metric names, got {value!r}"
        from normlab.diagnostics import METRICS

        unknown = [m for m in value if m not in METRICS]
        if unknown:
            return f"diagnostics: unknown metric(s) {unknown}; available: {list(METRICS)}"
    elif key == "model":
        if not isinstance(value, dict):
            return f"model: expected a table, got {type(value).__name__}"
    return None


def _resolve_ref(where: str, value: Any, schedule: dict[str, int]) -> tuple[Any, str | None]:
    """One kwarg value: a schedule reference resolved to an int, any other value unchanged, or a problem."""
    if not isinstance(value, str):
        return value, None
    match = _SCHEDULE_REF.match(value)
    if match is None:
        return value, None
    number, key = match.groups()
    if key in schedule:
        resolved = int(round(float(number if number is not None else 1) * schedule[key]))
        return resolved, None
    # A bare word is an ordinary string kwarg (norm1 = "rms_norm") unless it looks like a misspelt reference.
    looks_like_ref = number is not None or key in _FIELDS or difflib.get_close_matches(key, SCHEDULE_KEYS, cutoff=0.6)
    if not looks_like_ref:
        return value, None
    hint = difflib.get_close_matches(key, SCHEDULE_KEYS, n=1, cutoff=0.6)
    why = "is not an integer schedule key" if key in _FIELDS else "is not a schedule key"
    return value, (
        f"{where}: schedule reference {value!r}: {key!r} {why}; expected '<key>' or '<number>*<key>' with key in "
        f"{list(SCHEDULE_KEYS)}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
    )


def resolve_schedule_refs(model: dict[str, Any], schedule: dict[str, int]) -> tuple[dict[str, Any], list[str]]:
    """A copy of the model config ``model`` with the schedule references in ``norm_kwargs`` and in each
    ``norm_overrides`` slot's ``kwargs`` resolved to ints against ``schedule``; and the problems found.

    >>> resolve_schedule_refs({"norm_kwargs": {"total_steps": "0.75*steps", "norm1": "rms_norm"}}, {"steps": 200})
    ({'norm_kwargs': {'total_steps': 150, 'norm1': 'rms_norm'}}, [])
    """
    out = copy.deepcopy(model)
    problems: list[str] = []

    def resolve(kwargs: Any, where: str) -> None:
        if not isinstance(kwargs, dict):
            return  # the model config reports the wrong type
        for k, v in kwargs.items():
            kwargs[k], problem = _resolve_ref(f"{where}.{k}", v, schedule)
            if problem:
                problems.append(problem)

    resolve(out.get("norm_kwargs"), "norm_kwargs")
    overrides = out.get("norm_overrides")
    if isinstance(overrides, dict):
        for slot, value in overrides.items():
            if isinstance(value, dict):
                resolve(value.get("kwargs"), f"norm_overrides.{slot}.kwargs")
    return out, problems


def model_config_class(task: str) -> Any:
    """The model config dataclass of a task: ``CNNConfig`` for ``digits``, else ``TransformerConfig``."""
    if task == "digits":
        from normlab.models.cnn import CNNConfig

        return CNNConfig
    from normlab.models.config import TransformerConfig

    return TransformerConfig


# Model-config fields whose validity does not depend on other fields: each is checked alone (everything else at its
# default) so that, e.g., an unknown norm, an unknown placement and d_model % n_heads != 0 are all reported at once
# although the model config's constructor stops at its first error.
_INDEPENDENT_MODEL_KEYS = {"lm_stdlib": ("norm", "placement", "mlp", "qk_norm"), "digits": ("norm",)}


def _error_text(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def _model_problems(model_cls: Any, task: str, merged: dict[str, Any]) -> tuple[Any, list[str]]:
    """Build ``model_cls`` from ``merged``; return ``(config or None, problems)`` with every problem found."""
    problems: list[str] = []
    bad: set[str] = set()
    for key in _INDEPENDENT_MODEL_KEYS.get(task, ()):
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
    problems: list[str] = []
    if not isinstance(data, dict):
        return SuiteConfig(), [f"expected a table at the top level, got {type(data).__name__}"], []
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        problems.append(f"unknown top-level key(s) {unknown}; known keys: {sorted(_FIELDS)}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("arms",) or key not in _FIELDS:
            continue
        problem = _check_value(key, value)
        if problem:
            problems.append(problem)
        else:
            values[key] = copy.deepcopy(value)
    cfg = SuiteConfig(**values)
    model_cls = model_config_class(cfg.task)
    model_fields = {f.name for f in dataclasses.fields(model_cls)}
    bad_model = sorted(set(cfg.model) - model_fields)
    if bad_model:
        problems.append(f"model: unknown key(s) {bad_model} for task {cfg.task!r}; known: {sorted(model_fields)}")
        cfg.model = {k: v for k, v in cfg.model.items() if k in model_fields}
    if cfg.task == "lm_stdlib" and cfg.model.get("vocab_size", 256) != 256:
        problems.append(f"model.vocab_size: the byte-level corpus needs 256, got {cfg.model['vocab_size']!r}")
    if cfg.warmup_steps > cfg.steps:
        problems.append(f"warmup_steps={cfg.warmup_steps} exceeds steps={cfg.steps}")
    for step in cfg.diagnostic_steps():
        if step > cfg.steps:
            problems.append(f"diagnostics_at: step {step} is after the last step (steps={cfg.steps})")

    raw_arms = data.get("arms", [])
    if not isinstance(raw_arms, list) or not raw_arms:
        problems.append(f"arms: expected a non-empty list of [[arms]] tables, got {raw_arms!r}")
        raw_arms = []
    seen: set[str] = set()
    buildable: list[tuple[int, ArmConfig]] = []
    for i, raw in enumerate(raw_arms):
        where = f"arms[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a table, got {type(raw).__name__}")
            continue
        name = raw.get("name")
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
            problems.append(f"{where}.name: expected a non-empty string of letters, digits, '-_.'; got {name!r}")
            name = f"#{i}"
        elif name in seen:
            problems.append(f"{where}.name: duplicate arm name {name!r}")
        seen.add(name)
        where = f"arms[{i}] ({name})"
        arm = ArmConfig(name=name)
        for key, value in raw.items():
            if key == "name":
                continue
            if key in ARM_TRAIN_KEYS:
                problem = _check_value(key, value)
                if problem:
                    problems.append(f"{where}: {problem}")
                else:
                    arm.train[key] = copy.deepcopy(value)
            elif key in model_fields:
                arm.model[key] = copy.deepcopy(value)
            else:
                problems.append(
                    f"{where}: unknown key {key!r}; an arm takes 'name', training overrides {list(ARM_TRAIN_KEYS)} "
                    f"or {model_cls.__name__} fields {sorted(model_fields)}"
                )
        merged, ref_problems = resolve_schedule_refs(cfg.arm_model(arm, resolve=False), cfg.arm_schedule(arm))
        problems += [f"{where}: {p}" for p in ref_problems]
        model_cfg, model_problems = _model_problems(model_cls, cfg.task, merged)
        problems += [f"{where}: {p}" for p in model_problems]
        if model_cfg is not None:
            if cfg.task == "lm_stdlib" and model_cfg.max_seq_len < cfg.seq_len:
                problems.append(f"{where}: max_seq_len={model_cfg.max_seq_len} is shorter than seq_len={cfg.seq_len}")
            if not ref_problems:
                buildable.append((i, arm))
        if arm.train.get("warmup_steps", 0) > cfg.steps:  # the suite's own warmup_steps is checked once, above
            problems.append(f"{where}: warmup_steps={arm.train['warmup_steps']} exceeds steps={cfg.steps}")
        cfg.arms.append(arm)
    return cfg, problems, buildable


def parse_suite(data: dict[str, Any], origin: str = "suite") -> SuiteConfig:
    """Validate a TOML-shaped dict and build a :class:`SuiteConfig`.

    Raises:
        SuiteError: listing every problem (unknown keys, bad values, unknown norms, impossible model shapes,
            schedule references that do not resolve).
    """
    cfg, problems, _ = validate_suite_dict(data, origin)
    if problems:
        raise SuiteError(problems, origin)
    return cfg


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError as exc:
            raise ImportError("reading suites on Python 3.10 needs tomli: pip install tomli") from exc
    return tomllib.loads(text)


def _suites_dir() -> Any:
    return resources.files("normlab.lab") / "suites"


def list_suites() -> dict[str, str]:
    """Packaged suites: ``{name: description}``, sorted by name."""
    out: dict[str, str] = {}
    for entry in sorted(_suites_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            data = _toml_loads(entry.read_text(encoding="utf-8"))
            out[entry.name[: -len(".toml")]] = str(data.get("description", ""))
    return out


def read_suite_dict(source: str | Path) -> tuple[dict[str, Any], str]:
    """Read a suite's raw dict from a packaged name (``"default"``) or a TOML path; returns ``(dict, origin)``.

    Raises:
        FileNotFoundError: neither a packaged suite nor an existing file (the message lists the packaged suites).
        SuiteError: the file is not valid TOML.
    """
    path = Path(source)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"suite file {str(path)!r} does not exist")
        text, origin = path.read_text(encoding="utf-8"), str(path)
    else:
        entry = _suites_dir() / f"{source}.toml"
        if not entry.is_file():
            raise FileNotFoundError(
                f"unknown suite {str(source)!r}: not a packaged suite ({', '.join(list_suites())}) nor a file"
            )
        text, origin = entry.read_text(encoding="utf-8"), f"suite {source!r}"
    try:
        return _toml_loads(text), origin
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise SuiteError([f"invalid TOML: {exc}"], origin) from exc


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], arms: list[str] | None = None) -> dict[str, Any]:
    """CLI > file: a copy of ``data`` with ``overrides`` (dotted keys: ``"model.d_model"``) set and, with ``arms``,
    only the named arms kept (in the given order).

    Raises:
        SuiteError: an override path through a non-table, or an arm name the suite does not have.
    """
    out, problems = collect_overrides(data, overrides, arms)
    if problems:
        raise SuiteError(problems, "command line")
    return out


def collect_overrides(
    data: dict[str, Any], overrides: dict[str, Any], arms: list[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """:func:`apply_overrides` without raising: the edited copy (what could be applied) and the problems."""
    out = copy.deepcopy(data)
    problems: list[str] = []
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                problems.append(f"override {dotted!r}: {part!r} is not a table")
                break
            node = nxt
        else:
            node[parts[-1]] = value
    if arms is not None:
        by_name = {a.get("name"): a for a in out.get("arms", []) if isinstance(a, dict)}
        missing = [a for a in arms if a not in by_name]
        if missing:
            problems.append(f"--arms: unknown arm(s) {missing}; the suite has {list(by_name)}")
        out["arms"] = [by_name[a] for a in arms if a in by_name]
    return out, problems


def load_suite(
    source: str | Path, overrides: dict[str, Any] | None = None, arms: list[str] | None = None
) -> SuiteConfig:
    """Read, override and validate a suite: packaged name or TOML path, then CLI overrides, then :func:`parse_suite`."""
    data, origin = read_suite_dict(source)
    return parse_suite(apply_overrides(data, overrides or {}, arms), origin)
