"""Suite config: packaged suites validate, every problem is reported at once, CLI > file > defaults."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from normlab.lab.config import SuiteConfig, SuiteError, apply_overrides, list_suites, load_suite, parse_suite
from normlab.lab.runner import lr_at
from normlab.lab.validate import check_suite
from tests.lab.conftest import toml_of


def test_the_packaged_suites_are_listed() -> None:
    assert {"default", "placement", "digits"} <= set(list_suites())


@pytest.mark.parametrize("name", sorted(list_suites()))
def test_packaged_suites_validate_and_build(name: str) -> None:
    cfg = load_suite(name)
    assert cfg.name == name and len(cfg.seeds) >= 2 and cfg.arms
    assert check_suite(cfg) == []


def test_default_suite_has_the_required_arms() -> None:
    cfg = load_suite("default")
    norms = [cfg.arm_model(a)["norm"] for a in cfg.arms]
    assert sorted(norms) == sorted(
        ["layer_norm", "rms_norm", "dyt", "batch_norm", "power_norm", "unified_norm", "prep_batch_norm"]
    )


def test_schedule_references_resolve_per_arm_and_follow_overrides(tiny: dict[str, Any]) -> None:
    tiny["arms"] = [
        {"name": "pn", "norm": "power_norm", "norm_kwargs": {"warmup_iters": "warmup_steps"}},
        {"name": "pn_late", "norm": "power_norm", "warmup_steps": 8, "norm_kwargs": {"warmup_iters": "warmup_steps"}},
        {"name": "prep", "norm": "prep_batch_norm",
         "norm_kwargs": {"total_steps": "0.75*steps", "warmup_steps": "0.1 * steps", "norm1": "rms_norm"}},
        {"name": "slot", "norm": "layer_norm",
         "norm_overrides": {"final": {"norm": "power_norm", "kwargs": {"warmup_iters": "2*eval_every"}}}},
    ]
    cfg = parse_suite(tiny)  # steps 20, warmup_steps 4, eval_every 5
    kwargs = {a.name: cfg.arm_model(a).get("norm_kwargs") for a in cfg.arms}
    assert kwargs["pn"] == {"warmup_iters": 4}
    assert kwargs["pn_late"] == {"warmup_iters": 8}  # the arm's own warmup_steps
    assert kwargs["prep"] == {"total_steps": 15, "warmup_steps": 2, "norm1": "rms_norm"}  # a plain string stays
    assert cfg.arm_model(cfg.arms[3])["norm_overrides"]["final"]["kwargs"] == {"warmup_iters": 10}
    assert cfg.to_dict()["arms"][0]["norm_kwargs"] == {"warmup_iters": "warmup_steps"}  # the suite keeps the reference
    assert check_suite(cfg) == []
    longer = parse_suite(apply_overrides(tiny, {"steps": 400, "warmup_steps": 40}))
    assert [longer.arm_model(a).get("norm_kwargs") for a in longer.arms][:3] == [
        {"warmup_iters": 40}, {"warmup_iters": 8}, {"total_steps": 300, "warmup_steps": 40, "norm1": "rms_norm"}
    ]


def test_unresolvable_schedule_references_are_reported(tiny: dict[str, Any]) -> None:
    tiny["arms"] = [
        {"name": "a", "norm": "power_norm", "norm_kwargs": {"warmup_iters": "warmup_step"}},
        {"name": "b", "norm": "prep_batch_norm", "norm_kwargs": {"total_steps": "0.5*epochs"}},
        {"name": "c", "norm": "power_norm", "norm_kwargs": {"warmup_iters": "lr"}},
    ]
    with pytest.raises(SuiteError) as info:
        parse_suite(tiny)
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert re.search(r"arms\[0\] \(a\): norm_kwargs.warmup_iters: schedule reference 'warmup_step'.*did you mean "
                     r"'warmup_steps'", problems[0])
    assert re.search(r"arms\[1\] \(b\): norm_kwargs.total_steps: schedule reference '0.5\*epochs': 'epochs' is "
                     r"not a schedule key; expected .*'steps', 'warmup_steps', 'eval_every'", problems[1])
    assert re.search(r"arms\[2\] \(c\): .*'lr' is not an integer schedule key", problems[2])


def test_default_suite_schedules_leave_warmup_and_finish_the_ramp() -> None:
    """PowerNorm and UN leave their warm-up and PRepBN's lambda reaches 0 within the suite's steps: run ``steps``
    training forward/backward passes of each arm (a tiny model of the same config otherwise)."""
    from normlab.models import DecoderLM, TransformerConfig
    from normlab.nn import PowerNorm, PRepBatchNorm, UnifiedNorm

    tiny_model = {"model.d_model": 16, "model.n_layers": 1, "model.n_heads": 2}
    for steps in (None, 40):  # the suite as shipped, and a --steps override
        overrides = dict(tiny_model, **({"steps": steps} if steps else {}))
        cfg = load_suite("default", overrides, arms=["power_norm", "unified_norm", "prep_batch_norm"])
        assert cfg.steps == (steps or 200)
        assert cfg.diagnostic_steps() == [0, cfg.steps]  # diagnostics_at = [0, "steps"] follows --steps
        for arm in cfg.arms:
            torch.manual_seed(0)
            model = DecoderLM(TransformerConfig.from_dict(cfg.arm_model(arm)))
            norms = [m for m in model.modules() if isinstance(m, (PowerNorm, UnifiedNorm, PRepBatchNorm))]
            assert len(norms) == 3, arm.name  # attn_in, mlp_in, final
            lambda_zero_at = None
            for step in range(1, cfg.steps + 1):
                ids = torch.randint(0, 256, (2, 8))
                model(ids, labels=ids).loss.backward()
                if arm.name == "prep_batch_norm" and lambda_zero_at is None:
                    if all(m.current_lambda() == 0.0 for m in norms):
                        lambda_zero_at = step
            for m in norms:
                if isinstance(m, (PowerNorm, UnifiedNorm)):
                    assert m.warmup_iters == cfg.warmup_of() and m.warmup_iters < cfg.steps
                    assert int(m.iters) == cfg.steps > m.warmup_iters  # out of warm-up for the last steps
            if arm.name == "prep_batch_norm":
                assert norms[0].total_steps == round(0.75 * cfg.steps)
                assert lambda_zero_at is not None and lambda_zero_at <= 0.75 * cfg.steps < cfg.steps


def test_every_problem_is_reported_at_once(tiny: dict[str, Any]) -> None:
    tiny["stepz"] = 3
    tiny["steps"] = 0
    tiny["lr"] = -1.0
    tiny["seeds"] = []
    tiny["model"]["widht"] = 3
    tiny["arms"] = [
        {"name": "a", "norm": "bathc_norm"},
        {"name": "a", "norm": "layer_norm", "colour": "red"},
        {"norm": "rms_norm", "n_heads": 3},  # no name; 32 % 3 != 0
    ]
    with pytest.raises(SuiteError) as info:
        parse_suite(tiny, "bad.toml")
    problems = info.value.problems
    text = "\n".join(problems)
    for pattern in (
        r"unknown top-level key\(s\) \['stepz'\]",
        r"steps: expected an int >= 1, got 0",
        r"lr: expected a number in \(0.0, inf\], got -1.0",
        r"seeds: expected a non-empty list",
        r"model: unknown key\(s\) \['widht'\]",
        r"arms\[0\] \(a\): unknown norm 'bathc_norm'; did you mean 'batch_norm'",
        r"arms\[1\]\.name: duplicate arm name 'a'",
        r"arms\[1\] \(a\): unknown key 'colour'",
        r"arms\[2\]\.name: expected a non-empty string",
        r"d_model divisible by n_heads, got d_model=32, n_heads=3",
    ):
        assert any(re.search(pattern, p) for p in problems), (pattern, text)
    assert str(info.value).startswith(f"bad.toml: {len(problems)} problem(s):")


def test_warmup_relative_to_the_schedule_follows_steps(tiny: dict[str, Any]) -> None:
    tiny.update(warmup_steps="0.2*steps", diagnostics_at=[0, "steps"])
    tiny["arms"] = [
        {"name": "pn", "norm": "power_norm", "norm_kwargs": {"warmup_iters": "warmup_steps"}},
        {"name": "own", "norm": "layer_norm", "warmup_steps": "0.4*eval_every"},
        {"name": "fixed", "norm": "layer_norm", "warmup_steps": 3},
    ]
    cfg = parse_suite(tiny)  # steps 20, eval_every 5
    assert cfg.warmup_of() == 4 and [cfg.arm_train(a)["warmup_steps"] for a in cfg.arms] == [4, 2, 3]
    assert cfg.arm_model(cfg.arms[0])["norm_kwargs"] == {"warmup_iters": 4}  # PowerNorm follows the LR warm-up
    assert cfg.to_dict()["warmup_steps"] == "0.2*steps" and cfg.to_dict()["arms"][1]["warmup_steps"] == "0.4*eval_every"
    shorter = parse_suite(apply_overrides(tiny, {"steps": 5}))  # an absolute warm-up of 4 would not fit: it shrinks
    assert shorter.warmup_of() == 1 and shorter.arm_model(shorter.arms[0])["norm_kwargs"] == {"warmup_iters": 1}
    assert parse_suite(shorter.to_dict()).to_dict() == shorter.to_dict()


@pytest.mark.parametrize("name", ["default", "placement", "digits"])
def test_packaged_suites_shrink_their_warmup_with_steps(name: str) -> None:
    full = load_suite(name)
    short = load_suite(name, {"steps": 10})
    assert short.warmup_of() <= 10 and short.warmup_of() < full.warmup_of()
    assert check_suite(short) == []


@pytest.mark.parametrize(
    ("warmup", "problem"),
    [
        ("0.1*warmup_steps", r"warmup_steps: expected an int >= 0 or a schedule reference \('0\.1\*steps'; keys "
                             r"\['steps', 'eval_every'\]\), got '0\.1\*warmup_steps'"),
        ("0.1*stepz", r"warmup_steps: expected an int >= 0 or a schedule reference .*got '0\.1\*stepz'"),
        (-1, r"warmup_steps: expected an int >= 0 or a schedule reference .*got -1"),
        ("2*steps", r"warmup_steps='2\*steps' \(40\) exceeds steps=20"),
    ],
)
def test_bad_relative_warmups_are_reported(tiny: dict[str, Any], warmup: Any, problem: str) -> None:
    tiny["warmup_steps"] = warmup
    tiny["arms"][1]["warmup_steps"] = warmup
    with pytest.raises(SuiteError) as info:
        parse_suite(tiny)
    problems = info.value.problems
    assert len(problems) == 2, problems  # the suite's and the arm's
    assert re.fullmatch(problem, problems[0]), problems[0]
    assert re.fullmatch(r"arms\[1\] \(bn\): " + problem, problems[1]), problems[1]


def test_schedule_problems_name_the_value_and_the_limit(tiny: dict[str, Any]) -> None:
    tiny.update(steps=20, warmup_steps=30, diagnostics_at=[0, "2*steps", "0.5*steps"])
    tiny["arms"][1]["warmup_steps"] = 25
    with pytest.raises(SuiteError) as info:
        parse_suite(tiny, "t.toml")
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert re.fullmatch(r"warmup_steps=30 exceeds steps=20", problems[0])  # the suite's, reported once
    # "2*steps" resolves to 40, after the last step; "0.5*steps" (10) is fine
    assert re.fullmatch(r"diagnostics_at: step 40 is after the last step \(steps=20\)", problems[1])
    assert re.fullmatch(r"arms\[1\] \(bn\): warmup_steps=25 exceeds steps=20", problems[2])


@pytest.mark.parametrize("bad", [["stepz"], ["2*lr"], [-1], [True], ["steps", "steps"], "steps"])
def test_diagnostics_at_entries_must_be_steps_or_schedule_references(tiny: dict[str, Any], bad: Any) -> None:
    tiny["diagnostics_at"] = bad
    with pytest.raises(SuiteError) as info:
        parse_suite(tiny)
    assert len(info.value.problems) == 1
    assert re.fullmatch(
        r"diagnostics_at: expected a list of distinct ints >= 0 or schedule references \('steps', '0\.5\*steps'; "
        r"keys \['steps', 'warmup_steps', 'eval_every'\]\), got " + re.escape(repr(bad)),
        info.value.problems[0],
    )


def test_shape_problems_that_only_building_finds(tiny: dict[str, Any]) -> None:
    tiny["arms"] = [{"name": "gn", "norm": "group_norm", "norm_kwargs": {"num_groups": 7}},
                    {"name": "ok", "norm": "layer_norm"}]
    cfg = parse_suite(tiny)
    problems = check_suite(cfg)
    assert len(problems) == 1 and "arms[0] (gn)" in problems[0] and "num_groups" in problems[0]


def test_dry_run_names_arms_by_their_position_in_the_file(tiny: dict[str, Any]) -> None:
    from normlab.lab.validate import dry_run_problems

    # arms[0] is not a table, so it is not in cfg.arms: the arm built and failing is still the file's arms[2]
    tiny["arms"] = ["layer_norm", {"name": "ok", "norm": "layer_norm"},
                    {"name": "gn7", "norm": "group_norm", "norm_kwargs": {"num_groups": 7}}]
    cfg, problems = dry_run_problems(tiny, "t.toml")
    assert [a.name for a in cfg.arms] == ["ok", "gn7"]
    assert len(problems) == 2, problems
    assert re.fullmatch(r"arms\[0\]: expected a table, got str", problems[0]), problems
    assert re.fullmatch(r"arms\[2\] \(gn7\): ValueError: .*num_groups.*", problems[1]), problems


def test_precedence_cli_over_file_over_defaults(tmp_path: Path, tiny: dict[str, Any]) -> None:
    del tiny["lr"]  # falls back to the dataclass default
    path = tmp_path / "s.toml"
    path.write_text(toml_of(tiny))
    cfg = load_suite(path, {"steps": 30, "model.d_model": 64, "seeds": [3]}, arms=["bn"])
    assert cfg.steps == 30 and cfg.seeds == [3] and cfg.model["d_model"] == 64
    assert cfg.batch_size == 4  # file
    assert cfg.lr == SuiteConfig().lr  # default
    assert [a.name for a in cfg.arms] == ["bn"]
    with pytest.raises(SuiteError, match=r"--arms: unknown arm\(s\) \['xx'\]"):
        apply_overrides(tiny, {}, arms=["xx"])


def test_round_trip_through_to_dict(tiny: dict[str, Any]) -> None:
    tiny["arms"][1]["lr"] = 1e-3
    cfg = parse_suite(tiny)
    again = parse_suite(cfg.to_dict())
    assert again == cfg
    assert cfg.arm_train(cfg.arms[1])["lr"] == 1e-3 and cfg.arm_train(cfg.arms[0])["lr"] == 3e-3
    assert cfg.arm_model(cfg.arms[0])["max_seq_len"] == 16
    assert cfg.eval_steps() == [0, 5, 10, 15, 20]


def test_unknown_suite_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="unknown suite 'nope'.*default"):
        load_suite("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3\n")
    with pytest.raises(SuiteError, match="invalid TOML"):
        load_suite(bad)


def test_lr_schedule_warmup_then_cosine() -> None:
    assert lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    mid = lr_at(55, 100, 1.0, 10, 0.1)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    values = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
