"""The training schedule: the learning-rate curve, and schedule references (settings tied to the schedule).

A schedule reference is a string ``"<key>"`` or ``"<number>*<key>"`` with ``key`` in :data:`SCHEDULE_KEYS`; it
resolves to ``int(round(number * value))`` of that key in a given schedule, e.g. ``"0.75*steps"`` is 150 at 200
steps. Norm keyword arguments and ``diagnostics_at`` use them, so that ``--steps N`` moves a norm's warm-up, a ramp
or a diagnostics step along with the run.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Collection
from typing import Any

__all__ = ["SCHEDULE_KEYS", "is_step_spec", "lr_at", "resolve_ref", "resolve_schedule_refs"]

# Integer schedule settings that references may name; an arm's own warmup_steps override is the value its
# references see.
SCHEDULE_KEYS = ("steps", "warmup_steps", "eval_every")
_SCHEDULE_REF = re.compile(r"^\s*(?:(\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*$")


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps, then cosine decay to
    ``min_ratio * peak`` at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak * (min_ratio + (1.0 - min_ratio) * cosine)


def is_step_spec(s: Any, keys: Collection[str] = SCHEDULE_KEYS) -> bool:
    """An int >= 0 or a schedule reference to one of ``keys``."""
    if isinstance(s, str):
        match = _SCHEDULE_REF.match(s)
        return match is not None and match.group(2) in keys
    return isinstance(s, int) and not isinstance(s, bool) and s >= 0


def resolve_ref(
    where: str, value: Any, schedule: dict[str, int], known_keys: Collection[str] = ()
) -> tuple[Any, str | None]:
    """One value: a schedule reference resolved to an int, any other value unchanged, or a problem.

    A bare word is an ordinary string (``norm1 = "rms_norm"``) unless it looks like a misspelt reference: a number
    times a word, a word of ``known_keys`` (the suite's other settings, which are not schedule keys) or a word close
    to a schedule key.
    """
    if not isinstance(value, str):
        return value, None
    match = _SCHEDULE_REF.match(value)
    if match is None:
        return value, None
    number, key = match.groups()
    if key in schedule:
        return int(round(float(number if number is not None else 1) * schedule[key])), None
    close = difflib.get_close_matches(key, SCHEDULE_KEYS, cutoff=0.6)
    if not (number is not None or key in known_keys or close):
        return value, None
    hint = difflib.get_close_matches(key, list(schedule), n=1, cutoff=0.6)
    why = "is not an integer schedule key" if key in known_keys else "is not a schedule key"
    return value, (
        f"{where}: schedule reference {value!r}: {key!r} {why}; expected '<key>' or '<number>*<key>' with key in "
        f"{list(schedule)}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
    )


def resolve_schedule_refs(
    model: dict[str, Any], schedule: dict[str, int], known_keys: Collection[str] = ()
) -> tuple[dict[str, Any], list[str]]:
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
            kwargs[k], problem = resolve_ref(f"{where}.{k}", v, schedule, known_keys)
            if problem:
                problems.append(problem)

    resolve(out.get("norm_kwargs"), "norm_kwargs")
    overrides = out.get("norm_overrides")
    if isinstance(overrides, dict):
        for slot, value in overrides.items():
            if isinstance(value, dict):
                resolve(value.get("kwargs"), f"norm_overrides.{slot}.kwargs")
    return out, problems
