"""Claims: validation with the suite (every problem at once), the verdict rule on rows with a known outcome, and the
report's Claims and Diagnosis sections built from them."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest

from normlab.lab.claims import compare, evaluate_claims
from normlab.lab.config import SuiteError, apply_overrides, parse_suite
from normlab.lab.dist import DistInfo
from normlab.lab.findings import diagnose
from normlab.lab.report import render_report
from normlab.lab.rundir import write_env
from normlab.lab.schema import ROWS_FILE, RowLog, make_row
from normlab.lab.validate import dry_run_problems

ARMS = ["ref", "better", "worse", "same", "noisy", "far", "div", "err", "lonely", "mix", "pre"]


def _suite(claims: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "claims", "task": "lm_stdlib", "steps": 10, "batch_size": 2, "seq_len": 8, "warmup_steps": 1,
        "eval_every": 10, "seeds": [0, 1], "diagnostics_at": [0, "steps"], "diagnostics": ["angular_distance"],
        "model": {"d_model": 16, "n_layers": 4, "n_heads": 2},
        "arms": [{"name": a} for a in ARMS], "claims": claims,
    }


def _claim(cid: str, a: str | list[str], relation: str, b: str = "ref", **extra: Any) -> dict[str, Any]:
    return {"id": cid, "text": f"claim {cid}", "paper": "A. Author 2025, A Paper", "url": "https://arxiv.org/abs/0",
            "a": a, "relation": relation, "b": b, **extra}


CLAIMS = [
    _claim("better_held", "better", "less"),
    _claim("worse_not_held", "worse", "less"),
    _claim("noisy_not_separable", "noisy", "less"),
    _claim("same_equivalent", "same", "equivalent", margin=0.05),
    _claim("far_not_equivalent", "far", "equivalent", margin=0.05),
    _claim("noisy_equivalent_not_separable", "noisy", "equivalent", margin=0.05),
    _claim("worse_greater", "worse", "greater"),
    _claim("diverged_a", "div", "less"),
    _claim("diverged_b", "ref", "less", b="div"),
    _claim("diverged_equivalent", "div", "equivalent", margin=0.05),
    _claim("error_no_data", "err", "less"),
    _claim("one_seed", "lonely", "less"),
    _claim("all_of_two_held", ["better", "same"], "less", b="worse"),
    _claim("one_of_two_failed", ["better", "worse"], "less"),
    _claim("deep_angular", "mix", "greater", b="pre", metric="diag:angular_distance:all_tokens", layers="deep"),
    _claim("all_angular", "mix", "greater", b="pre", metric="diag:angular_distance:all_tokens"),
]
EXPECTED = {
    "better_held": "held", "worse_not_held": "did not hold", "noisy_not_separable": "not separable",
    "same_equivalent": "held", "far_not_equivalent": "did not hold",
    "noisy_equivalent_not_separable": "not separable", "worse_greater": "held", "diverged_a": "did not hold",
    "diverged_b": "held", "diverged_equivalent": "did not hold", "error_no_data": "no data",
    "one_seed": "not separable", "all_of_two_held": "held", "one_of_two_failed": "did not hold",
    "deep_angular": "held", "all_angular": "did not hold",
}
# Final validation loss per arm and seed (ref ~2.0, seed spread 0.01).
FINAL = {"ref": [2.0, 2.01], "better": [1.8, 1.81], "worse": [2.3, 2.31], "same": [2.005, 2.012],
         "noisy": [1.8, 2.3], "far": [2.2, 2.21], "div": [2.0, None], "lonely": [1.5], "mix": [2.0, 2.0],
         "pre": [2.0, 2.0]}
# Angular distance per layer 1..4: mix is larger in the deep half (3, 4), pre in the shallow half and overall.
ANGULAR = {"mix": [0.1, 0.1, 0.5, 0.5], "pre": [0.9, 0.9, 0.2, 0.2]}


def _rows() -> list[dict[str, Any]]:
    rows = []
    for arm, finals in FINAL.items():
        for seed, final in enumerate(finals):
            rows.append(make_row(arm, seed, 0, "eval", "val_loss", 5.5))
            status = "ok" if final is not None else "diverged"
            if final is not None:
                rows.append(make_row(arm, seed, 10, "eval", "val_loss", final))
            rows.append(make_row(arm, seed, 0, "health", "hidden_rms_max", 0.02, block=1))
            rows.append(make_row(arm, seed, 10 if final is not None else 5, "status", "status", None, status=status,
                                 message="" if final is not None else "train loss 40 at step 5 exceeds the limit"))
    for arm, per_layer in ANGULAR.items():
        for seed in (0, 1):
            for ell, v in enumerate(per_layer, start=1):
                rows.append(make_row(arm, seed, 10, "diag", "angular_distance:all_tokens", v + 0.01 * seed, layer=ell))
                rows.append(make_row(arm, seed, 0, "diag", "angular_distance:all_tokens", 0.0, layer=ell))
    for seed in (0, 1):
        rows.append(make_row("err", seed, 0, "status", "status", None, status="error", message="ValueError: boom"))
        # the evidence of a failed claim: "worse" saturated and froze from step 10
        rows.append(make_row("worse", seed, 10, "health", "saturation_max", 0.99, module="final_norm"))
        rows.append(make_row("worse", seed, 10, "health", "frozen_fraction", 0.97, frozen_tensors=40,
                             names=["embed.weight"], steps=10))
        rows.append(make_row("worse", seed, 10, "health", "hidden_rms_max", 250.0, block=4))
        rows.append(make_row("ref", seed, 10, "health", "frozen_fraction", 0.0, frozen_tensors=0, names=[], steps=10))
    return rows


def test_each_verdict_on_rows_with_a_known_outcome() -> None:
    cfg = parse_suite(_suite(CLAIMS))
    results = evaluate_claims(cfg, _rows(), {a: 4 for a in ARMS})
    assert {r.claim.id: r.verdict for r in results} == EXPECTED
    by_id = {r.claim.id: r for r in results}
    better = by_id["better_held"].comparisons[0]
    assert better.diff == pytest.approx(-0.2) and better.values_a == {0: 1.8, 1: 1.81}
    assert better.spread == pytest.approx(2 * math.sqrt(0.01**2 / 2 / 2 + 0.01**2 / 2 / 2))
    assert by_id["diverged_a"].comparisons[0].reason == "div diverged"
    assert by_id["one_seed"].comparisons[0].reason == "one seed: no spread"
    assert [c.verdict for c in by_id["one_of_two_failed"].comparisons] == ["held", "did not hold"]
    assert by_id["far_not_equivalent"].comparisons[0].reason == "far higher"


def test_compare_boundaries() -> None:
    a, b = {0: 1.0, 1: 1.2}, {0: 1.3, 1: 1.5}  # d = -0.3, u = 2 * sqrt(0.02/2 + 0.02/2) = 0.283
    assert compare(a, b, "less").verdict == "held"
    assert compare(a, b, "greater").verdict == "did not hold"
    assert compare(a, b, "equivalent", 0.6).verdict == "held"  # 0.3 + 0.283 < 0.6
    assert compare(a, b, "equivalent", 0.5).verdict == "not separable"
    assert compare(a, b, "equivalent", 0.01).verdict == "did not hold"  # 0.3 - 0.283 > 0.01
    assert compare({}, b, "less").verdict == "no data"
    assert compare({0: math.inf}, {0: math.inf}, "less").verdict == "not separable"


def test_claim_problems_are_all_reported() -> None:
    bad = [
        _claim("unknown_arm", "nope", "less"),
        _claim("unknown_metric", "better", "less", metric="val_perplexity"),
        _claim("undiagnosed", "better", "less", metric="diag:attention_entropy"),
        _claim("no_margin", "same", "equivalent"),
        _claim("margin_on_less", "better", "less", margin=0.1),
        _claim("bad_relation", "better", "smaller"),
        _claim("layers_on_loss", "better", "less", layers="deep"),
        _claim("self", "ref", "less"),
        {**_claim("unknown_arm", "better", "less"), "extra": 1, "url": "arxiv 1234"},
    ]
    with pytest.raises(SuiteError) as info:
        parse_suite(_suite(bad))
    text = "\n".join(info.value.problems)
    for fragment in (
        r"claims\[0\] \(unknown_arm\): unknown arm 'nope'",
        r"claims\[1\] \(unknown_metric\): metric: unknown metric 'val_perplexity'",
        r"claims\[2\] \(undiagnosed\): metric 'diag:attention_entropy': the suite does not record",
        r"claims\[3\] \(no_margin\): margin: an 'equivalent' claim needs a number > 0",
        r"claims\[4\] \(margin_on_less\): margin: only an 'equivalent' claim has a margin",
        r"claims\[5\] \(bad_relation\): relation: expected one of",
        r"claims\[6\] \(layers_on_loss\): layers: only a 'diag:' metric is per layer",
        r"claims\[7\] \(self\): a and b: arm 'ref' is compared with itself",
        r"claims\[8\] \(unknown_arm\): id: duplicate claim id",
        r"claims\[8\] \(unknown_arm\): unknown key 'extra'",
        r"claims\[8\] \(unknown_arm\): url: expected an http\(s\) link",
    ):
        assert __import__("re").search(fragment, text), fragment
    assert len(info.value.problems) == 11


def test_dry_run_reports_claim_problems_with_the_others() -> None:
    data = _suite([_claim("x", "nope", "less", metric="val_perplexity")])
    data["steps"] = 0
    _, problems = dry_run_problems(data, "test")
    assert any(p.startswith("steps:") for p in problems)
    assert any("unknown arm 'nope'" in p for p in problems) and any("val_perplexity" in p for p in problems)


def test_arms_filter_keeps_only_claims_on_kept_arms() -> None:
    data = _suite(copy.deepcopy(CLAIMS))
    cfg = parse_suite(apply_overrides(data, {}, ["ref", "better", "worse", "same"]))
    assert [c.id for c in cfg.claims] == ["better_held", "worse_not_held", "same_equivalent", "worse_greater",
                                          "all_of_two_held", "one_of_two_failed"]


def test_claims_round_trip_through_to_dict() -> None:
    cfg = parse_suite(_suite(CLAIMS))
    assert parse_suite(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert cfg.to_dict()["claims"][12]["a"] == ["better", "same"] and cfg.to_dict()["claims"][0]["a"] == "better"


def test_report_claims_and_diagnosis_sections(tmp_path: Path) -> None:
    cfg = parse_suite(_suite(CLAIMS))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_env(run_dir, cfg, ["normlab", "lab", "--test"], DistInfo())
    RowLog(run_dir / ROWS_FILE).write(_rows())
    md = render_report(run_dir, plots=False).read_text(encoding="utf-8")
    claims = md[md.index("## Claims"):md.index("## Diagnosis")]
    for cid, verdict in EXPECTED.items():
        line = next(ln for ln in claims.splitlines() if f"**{cid}**" in ln)
        shown = line.rstrip(" |").split(" | ")[-1]
        assert shown.split(" (")[0] == verdict or shown.endswith(f"(claim: {verdict})"), (cid, line)
    assert "| worse < ref | final_val_loss | 2.3050 | 2.0050 | +0.3000 ± 0.0141 | 2/2 | did not hold |" in claims
    assert "| 2/2 | did not hold (far higher) |" in claims
    evidence = claims[claims.index("### Where a claim did not hold"):]
    assert "**worse_not_held** (worse < ref): worse: saturated: 99% of the inputs of `final_norm`" in evidence
    assert "frozen: 97% of the parameters" in evidence and "ref: no failure detected" in evidence
    assert "**diverged_a**" in evidence and "div: diverged at step 5 (1/2 seeds)" in evidence
    diagnosis = md[md.index("## Diagnosis"):]
    assert "exploding hidden state: block 4 output RMS 250 (step 0: 0.02), from step 10" in diagnosis
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert '<a href="https://arxiv.org/abs/0">A. Author 2025, A Paper</a>' in html and "<strong>better_held" in html


def test_diagnose_flags_only_past_the_thresholds() -> None:
    found = diagnose(_rows(), ["worse", "ref", "div"], [0, 1])
    assert len(found["worse"].flags()) == 3 and found["worse"].saturated_from == {0: 10, 1: 10}
    assert found["ref"].flags() == [] and found["ref"].frozen == 0.0
    assert found["div"].flags() == ["diverged at step 5 (1/2 seeds)"]
