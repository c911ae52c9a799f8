"""The ``inpainting`` task and suite: PSNR / L1 by hand, claims on the task's own eval metrics (a diverged seed is
the worst value in the metric's direction), the suite validating at every scale, and its smoke scale running end to
end with a Claims section."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from normlab.cli import main
from normlab.lab.claims import VERDICTS, arm_values, evaluate_claims, parse_claims
from normlab.lab.config import load_suite, read_suite_dict
from normlab.lab.tasks import TASK_CLASSES, task_class
from normlab.lab.tasks_inpainting import InpaintingTask, inpainting_metrics
from normlab.lab.validate import dry_run_problems


def test_metrics_by_hand() -> None:
    image = torch.zeros(2, 1, 2, 2)
    output = torch.full((2, 1, 2, 2), 0.5)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]).reshape(2, 1, 2, 2)
    m = inpainting_metrics(output, image, mask)
    # composite error 0.5 on the hole pixels only: image 0 has 1 of 4, image 1 has 2 of 4
    assert torch.allclose(m["val_l1"], torch.tensor([0.125, 0.25]))
    assert torch.allclose(m["val_l1_hole"], torch.tensor([0.5, 0.5]))
    assert torch.allclose(m["val_psnr"], -10 * torch.log10(torch.tensor([0.0625, 0.125])))
    assert torch.allclose(m["val_psnr_hole"], torch.full((2,), -10 * math.log10(0.25)))
    exact = inpainting_metrics(image, image, mask)
    assert torch.equal(exact["val_psnr"], torch.full((2,), 100.0))  # capped


def test_task_is_registered_with_its_metrics() -> None:
    assert TASK_CLASSES["inpainting"] is InpaintingTask is task_class("inpainting")
    assert InpaintingTask.eval_metrics == ("val_loss", "val_psnr", "val_l1", "val_psnr_hole", "val_l1_hole")
    assert set(InpaintingTask.higher_is_better) == {"val_psnr", "val_psnr_hole"}


def _claim(**kw: Any) -> dict[str, Any]:
    return {"id": "c", "text": "t", "paper": "p", "url": "https://arxiv.org/abs/1911.10375", "a": "rn",
            "relation": "greater", "b": "instance_norm", "metric": "final_val_psnr", **kw}


def test_claims_take_the_task_metrics_and_refuse_others() -> None:
    cfg = load_suite("inpainting")
    claims, problems = parse_claims([_claim(), _claim(id="d", metric="final_val_l1_hole", relation="less")], cfg,
                                    InpaintingTask.eval_metrics)
    assert problems == [] and [c.metric for c in claims] == ["final_val_psnr", "final_val_l1_hole"]
    _, problems = parse_claims([_claim(metric="final_val_ssim")], cfg, InpaintingTask.eval_metrics)
    assert len(problems) == 1 and "unknown metric 'final_val_ssim'" in problems[0] and "final_val_psnr" in problems[0]
    _, problems = parse_claims([_claim()], load_suite("digits"), task_class("digits").eval_metrics)
    assert any("unknown metric 'final_val_psnr'" in p for p in problems)


def _rows(psnr: dict[tuple[str, int], float | None], diverged: set[tuple[str, int]]) -> list[dict[str, Any]]:
    rows = []
    for (arm, seed), v in psnr.items():
        if v is not None:
            rows.append({"arm": arm, "seed": seed, "step": 10, "kind": "eval", "metric": "val_psnr", "value": v})
        rows.append({"arm": arm, "seed": seed, "step": 10, "kind": "status", "metric": "status", "value": None,
                     "status": "diverged" if (arm, seed) in diverged else "ok"})
    return rows


def test_a_diverged_seed_is_the_worst_value_in_the_metric_direction() -> None:
    rows = _rows({("rn", 0): 20.0, ("rn", 1): None}, {("rn", 1)})
    statuses = {0: "ok", 1: "diverged"}
    assert arm_values(rows, "rn", "final_val_psnr", statuses=statuses, higher_is_better=True) == {0: 20.0,
                                                                                                    1: -math.inf}
    assert arm_values(rows, "rn", "final_val_l1", statuses=statuses)[1] == math.inf
    cfg = load_suite("inpainting")
    rows = _rows({("rn", 0): 20.0, ("rn", 1): 21.0, ("instance_norm", 0): 18.0, ("instance_norm", 1): None},
                 {("instance_norm", 1)})
    result = next(r for r in evaluate_claims(cfg, rows) if r.claim.id == "rn_psnr_gt_in")
    assert result.verdict == "held" and result.comparisons[0].reason == "instance_norm diverged"
    rows = _rows({("rn", 0): 20.0, ("rn", 1): 20.2, ("instance_norm", 0): 21.0, ("instance_norm", 1): 21.1}, set())
    result = next(r for r in evaluate_claims(cfg, rows) if r.claim.id == "rn_psnr_gt_in")
    assert result.verdict == "did not hold"


@pytest.mark.parametrize("scale", ["smoke", "default"])
def test_suite_dry_run(scale: str) -> None:
    data, origin = read_suite_dict("inpainting")
    cfg, problems = dry_run_problems(data, origin, scale=scale)
    assert problems == [] and cfg.task == "inpainting"
    assert [a.name for a in cfg.arms] == ["rn", "rn_b_only", "instance_norm", "batch_norm"] and len(cfg.seeds) >= 2
    assert {c.metric for c in cfg.claims} == {"final_val_psnr", "final_val_l1"}


def test_suite_problems_name_val_fraction() -> None:
    data, origin = read_suite_dict("inpainting")
    data["val_fraction"] = 0.01
    _, problems = dry_run_problems(data, origin, scale="smoke")
    assert any("val_fraction: 0.01 leaves a region narrower than a 32-pixel crop" in p for p in problems)


def test_smoke_scale_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "smoke"
    assert main(["lab", "--suite", "inpainting", "--scale", "smoke", "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "final val psnr" in printed and "final val l1 hole" in printed and "samples/s" in printed
    md = (out / "report.md").read_text(encoding="utf-8")
    claims = md[md.index("## Claims"):md.index("## Diagnosis")]
    for claim in load_suite("inpainting").claims:
        line = next(ln for ln in claims.splitlines() if f"**{claim.id}**" in ln)
        verdict = line.rstrip(" |").split(" | ")[-1].split(" (")[0]
        assert verdict in VERDICTS and verdict != "no data"
