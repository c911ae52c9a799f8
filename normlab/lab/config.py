"""Suite configuration: the :class:`SuiteConfig` / :class:`ArmConfig` dataclasses, TOML loading and validation.

A suite is a TOML file: top-level training settings, a ``[model]`` table (the base model configuration of every
arm), ``[[arms]]`` tables, ``[[claims]]`` tables (what the papers claim about the arms,
:mod:`normlab.lab.claims`) and ``[scales.smoke]`` / ``[scales.paper]`` presets (``--scale``: smaller or larger
runs of the same comparison). An arm has a ``name`` and overrides: keys in :data:`ARM_TRAIN_KEYS` override the
training settings, every other key overrides a field of the task's model config (``TransformerConfig`` for
``task = "lm_stdlib"``, ``CNNConfig`` for ``task = "digits"``). Each arm runs once per seed.

Norm keyword arguments may be tied to the training schedule (:data:`SCHEDULE_KEYS`): a string value of the form
``"<key>"`` or ``"<number>*<key>"`` in ``norm_kwargs`` (or in a ``norm_overrides`` slot's ``kwargs``) resolves to
``int(round(number * value))`` of that arm's schedule, e.g. ``warmup_iters = "warmup_steps"`` or
``total_steps = "0.75*steps"``. So ``--steps N`` keeps PowerNorm's warm-up tied to the LR warm-up and PRepBN's
LayerNorm -> RepBN ramp inside training. :meth:`SuiteConfig.arm_model` returns the resolved integers; the suite
(``to_dict``) keeps the references as written. ``warmup_steps`` itself may be a reference to ``steps`` or
``eval_every`` (``"0.1*steps"``), so that a shorter run also has a shorter warm-up.

Validation (:mod:`normlab.lab.validators`, a table of per-key validators) reports every problem at once
(:class:`SuiteError` carries the list), naming the key, what was expected and what was received. Precedence is
CLI > file > defaults: :func:`apply_overrides` edits the raw dict before :func:`parse_suite` turns it into a
:class:`SuiteConfig`. What differs between tasks (model config class, model defaults) is asked of the task's class
(:mod:`normlab.lab.tasks`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from normlab.lab import schedule as _schedule
from normlab.lab.claims import ClaimConfig
from normlab.lab.schedule import SCHEDULE_KEYS
from normlab.lab.tasks import TASK_CLASSES, task_class

__all__ = [
    "ARM_TRAIN_KEYS",
    "SCALES",
    "SCHEDULE_KEYS",
    "TASKS",
    "ArmConfig",
    "SuiteConfig",
    "SuiteError",
    "apply_overrides",
    "apply_scale",
    "collect_overrides",
    "list_suites",
    "model_config_class",
    "load_suite",
    "parse_suite",
    "read_suite_dict",
    "resolve_schedule_refs",
    "toml_loads",
    "validate_suite_dict",
]

TASKS = tuple(TASK_CLASSES)
ARM_TRAIN_KEYS = ("lr", "batch_size", "warmup_steps", "weight_decay", "grad_clip")
# --scale presets: "default" is the suite file as written; the others are its [scales.<name>] tables.
SCALES = ("smoke", "default", "paper")
# Top-level settings a scale preset may set (the model table is merged key by key, not replaced).
SCALE_KEYS = ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "eval_every", "eval_batches", "eval_batch_size",
              "seeds", "diagnostics_at", "model")


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
        task: ``"lm_stdlib"`` (byte-level LM on the Python stdlib source), ``"digits"`` (CNN on sklearn digits), or
            ``"tta"`` / ``"federated"`` (corrupted digits, :mod:`normlab.lab.tasks_shift`).
        steps: optimizer steps per arm and seed.
        batch_size: sequences (LM) or images (digits) per step and process.
        seq_len: LM window length in bytes.
        lr: peak learning rate of AdamW.
        warmup_steps: linear warmup from 0 to ``lr``; then cosine decay to ``min_lr_ratio * lr`` at ``steps``. An int,
            or a schedule reference to ``steps`` or ``eval_every`` (``"0.1*steps"``), so that ``--steps N`` shrinks or
            grows the warm-up with the run (:meth:`warmup_of` resolves it).
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
        claims: what the suite's papers claim about its arms (:mod:`normlab.lab.claims`), each checked against the
            rows in the report's Claims section.
        scales: ``--scale`` presets: ``{"smoke": {...}, "paper": {...}}``, each a table of settings
            (:data:`SCALE_KEYS`; ``model`` is merged into the model table) applied over the file by
            :func:`apply_scale`; ``default`` is the file as written.
        scale: which preset the settings are (recorded by :func:`apply_scale`; a suite file leaves it ``default``).
        impl: the implementation every arm's norms run (``"auto"``: the fused kernels where available;
            ``"composite"``: the plain PyTorch ops; see :func:`normlab.kernels.use_impl`). ``--set impl=composite``
            gives the numbers of a build without kernels; the two agree to float32 rounding, not bit for bit.
    """

    name: str = "suite"
    description: str = ""
    task: str = "lm_stdlib"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    warmup_steps: int | str = 20
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
    claims: list[ClaimConfig] = field(default_factory=list)
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    scale: str = "default"
    impl: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        """The suite as a TOML-shaped dict (``arms`` flat); :func:`parse_suite` of it gives back an equal config."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in ("arms", "claims")}
        out["arms"] = [a.to_dict() for a in self.arms]
        out["claims"] = [c.to_dict() for c in self.claims]
        return out

    def warmup_of(self, value: int | str | None = None) -> int:
        """The suite's ``warmup_steps`` (or ``value``, an arm's override) in steps: a schedule reference
        (``"0.1*steps"``) resolved against ``steps`` and ``eval_every``.

        Raises:
            ValueError: a reference that does not resolve (:func:`parse_suite` reports these first).
        """
        value = self.warmup_steps if value is None else value
        resolved, problem = _schedule.resolve_ref("warmup_steps", value, self.warmup_schedule(), SUITE_KEYS)
        if problem or not isinstance(resolved, int):
            raise ValueError(problem or f"warmup_steps: expected an int or a schedule reference, got {value!r}")
        return resolved

    def warmup_schedule(self) -> dict[str, int]:
        """What a ``warmup_steps`` reference may name (not itself)."""
        return {"steps": self.steps, "eval_every": self.eval_every}

    def arm_train(self, arm: ArmConfig) -> dict[str, Any]:
        """The training settings of ``arm``: the suite's, with the arm's overrides; ``warmup_steps`` resolved."""
        base = {k: getattr(self, k) for k in ARM_TRAIN_KEYS}
        base.update(arm.train)
        base["warmup_steps"] = self.warmup_of(base["warmup_steps"])
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
        for key, value in task_class(self.task).model_defaults(self).items():
            merged.setdefault(key, value)
        if resolve:
            merged, problems = resolve_schedule_refs(merged, self.arm_schedule(arm))
            if problems:
                raise ValueError(f"arm {arm.name!r}: " + "; ".join(problems))
        return merged

    def diagnostic_steps(self) -> list[int]:
        """``diagnostics_at`` with schedule references (``"steps"``, ``"0.5*steps"``) resolved: sorted ints."""
        schedule = {"steps": self.steps, "warmup_steps": self.warmup_of(), "eval_every": self.eval_every}
        return sorted({_schedule.resolve_ref("diagnostics_at", s, schedule)[0] for s in self.diagnostics_at})

    def eval_steps(self) -> list[int]:
        """The steps with an evaluation and a checkpoint: 0, every ``eval_every``, and ``steps``."""
        return sorted({0, self.steps, *range(self.eval_every, self.steps + 1, self.eval_every)})


SUITE_KEYS = tuple(f.name for f in dataclasses.fields(SuiteConfig))


def resolve_schedule_refs(model: dict[str, Any], schedule: dict[str, int]) -> tuple[dict[str, Any], list[str]]:
    """:func:`normlab.lab.schedule.resolve_schedule_refs`, with the suite's other settings named as not being
    schedule keys (``"lr"`` is reported, not taken for a string).

    >>> resolve_schedule_refs({"norm_kwargs": {"total_steps": "0.75*steps", "norm1": "rms_norm"}}, {"steps": 200})
    ({'norm_kwargs': {'total_steps': 150, 'norm1': 'rms_norm'}}, [])
    """
    return _schedule.resolve_schedule_refs(model, schedule, SUITE_KEYS)


def model_config_class(task: str) -> Any:
    """The model config dataclass of a task (``TransformerConfig`` for ``lm_stdlib``, ``CNNConfig`` for ``digits``)."""
    return task_class(task).model_config_class()


def validate_suite_dict(
    data: dict[str, Any], origin: str = "suite"
) -> tuple[SuiteConfig, list[str], list[tuple[int, ArmConfig]]]:
    """Validate a TOML-shaped dict, collecting every problem instead of raising
    (:func:`normlab.lab.validators.validate_suite_dict`).

    Returns:
        ``(cfg, problems, buildable)``: the config as far as it could be built (invalid settings keep their
        defaults), the problems, and the ``(index, arm)`` pairs whose model config was built.
    """
    from normlab.lab.validators import validate_suite_dict as validate

    return validate(data, origin)


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


def toml_loads(text: str) -> dict[str, Any]:
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
            data = toml_loads(entry.read_text(encoding="utf-8"))
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
        return toml_loads(text), origin
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise SuiteError([f"invalid TOML: {exc}"], origin) from exc


def apply_scale(data: dict[str, Any], scale: str = "default") -> tuple[dict[str, Any], list[str]]:
    """A copy of ``data`` with the ``--scale`` preset ``scale`` applied: the settings of ``data["scales"][scale]``
    replace the file's (``model`` is merged key by key) and ``scale`` records the preset. ``"default"`` is the file
    as written. Precedence: file < scale < command line (apply overrides after this). Returns ``(data, problems)``:
    an unknown scale, or one the suite does not define."""
    out = copy.deepcopy(data)
    if scale not in SCALES:
        return out, [f"--scale: expected one of {SCALES}, got {scale!r}"]
    out["scale"] = scale
    if scale == "default":
        return out, []
    presets = out.get("scales", {})
    preset = presets.get(scale) if isinstance(presets, dict) else None
    if not isinstance(preset, dict):
        defined = ["default", *sorted(presets)] if isinstance(presets, dict) else ["default"]
        return out, [f"--scale {scale}: the suite defines no [scales.{scale}] table; its scales: {defined}"]
    for key, value in preset.items():
        if key == "model" and isinstance(value, dict) and isinstance(out.get("model", {}), dict):
            out.setdefault("model", {}).update(copy.deepcopy(value))
        else:
            out[key] = copy.deepcopy(value)
    return out, []


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
    """:func:`apply_overrides` without raising: the edited copy (what could be applied) and the problems. Claims
    that compare an arm left out by ``arms`` are dropped with it."""
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
        if isinstance(out.get("claims"), list):
            out["claims"] = [c for c in out["claims"] if not isinstance(c, dict) or _claim_arms(c) <= set(arms)]
    return out, problems


def _claim_arms(claim: dict[str, Any]) -> set[Any]:
    a = claim.get("a")
    return {*(a if isinstance(a, list) else [a]), claim.get("b")}


def load_suite(
    source: str | Path, overrides: dict[str, Any] | None = None, arms: list[str] | None = None,
    scale: str = "default",
) -> SuiteConfig:
    """Read, scale, override and validate a suite: packaged name or TOML path, then the ``scale`` preset
    (:func:`apply_scale`), then CLI overrides, then :func:`parse_suite`."""
    data, origin = read_suite_dict(source)
    data, problems = apply_scale(data, scale)
    if problems:
        raise SuiteError(problems, origin)
    return parse_suite(apply_overrides(data, overrides or {}, arms), origin)
