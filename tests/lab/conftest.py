"""Tiny suites shared by the lab tests (seconds, not minutes)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

TINY: dict[str, Any] = {
    "name": "tiny",
    "task": "lm_stdlib",
    "steps": 20,
    "batch_size": 4,
    "seq_len": 16,
    "lr": 3e-3,
    "warmup_steps": 4,
    "eval_every": 5,
    "eval_batches": 2,
    "eval_batch_size": 4,
    "seeds": [0, 1],
    "diagnostics_at": [0, 12, 20],
    "diagnostics": ["hidden_variance"],
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2},
    "arms": [{"name": "ln", "norm": "layer_norm"}, {"name": "bn", "norm": "batch_norm"}],
}


@pytest.fixture
def tiny() -> dict[str, Any]:
    return copy.deepcopy(TINY)


def toml_of(data: dict[str, Any]) -> str:
    """A minimal TOML writer for the suites the tests build (scalars, lists, one-level tables, [[arms]])."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
        return repr(v)

    lines = [f"{k} = {val(v)}" for k, v in data.items() if k not in ("model", "arms")]
    lines.append("[model]")
    lines += [f"{k} = {val(v)}" for k, v in data.get("model", {}).items()]
    for arm in data.get("arms", []):
        lines.append("[[arms]]")
        lines += [f"{k} = {val(v)}" for k, v in arm.items()]
    return "\n".join(lines) + "\n"
