"""The vision lab tasks and suites: the optional Task training hooks (parameter groups with freezing and ``lr_scale``,
optimizer preparation), the BN-only / random-match freezing, AGC and Fixup scalar groups, the appearance shift, the
task's extra eval metrics in claims and the summary table, and each vision suite's smoke scale end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from normlab.cli import main
from normlab.lab import tasks as tasks_mod
from normlab.lab.claims import arm_values, parse_claims
from normlab.lab.config import load_suite, parse_suite
from normlab.lab.dist import DistInfo
from normlab.lab.runner import run_suite
from normlab.lab.tasks import DigitsTask, task_class
from normlab.lab.tasks_vision import (
    DigitsResNetTask,
    StyleShiftTask,
    VisionResNetConfig,
    appearance_shift,
    norm_affine_parameters,
)

TINY_VISION: dict[str, Any] = {
    "name": "tiny_vision",
    "task": "digits_resnet",
    "steps": 3,
    "batch_size": 8,
    "lr": 1e-2,
    "warmup_steps": 0,
    "eval_every": 3,
    "eval_batch_size": 512,
    "seeds": [0],
    "diagnostics": [],
    "model": {"depth": 8, "width": 4, "image_size": 8},
    "arms": [{"name": "gn", "norm": "group_norm", "norm_kwargs": {"num_groups": 2}}],
}


def _model(**kw: Any) -> nn.Module:
    torch.manual_seed(0)
    return DigitsResNetTask.build(VisionResNetConfig(depth=8, width=4, image_size=8, **kw))


def _task(data: dict[str, Any] | None = None) -> DigitsResNetTask:
    cfg = parse_suite(json.loads(json.dumps(data or TINY_VISION)))
    return DigitsResNetTask(cfg, DistInfo(), torch.device("cpu"))


def test_default_parameter_groups_are_the_loops_former_split() -> None:
    model = nn.ModuleDict({"embed": nn.Embedding(5, 4), "out": nn.Linear(4, 3)})
    groups = DigitsTask.parameter_groups(None, model, 0.1)  # type: ignore[arg-type]  # does not touch self
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([3, 4])]  # the embedding is not decayed
    assert {tuple(p.shape) for p in groups[1]["params"]} == {(5, 4), (3,)}
    opt = torch.optim.AdamW(groups)
    assert DigitsTask.prepare_optimizer(None, opt, model) is None  # type: ignore[arg-type,func-returns-value]
    assert not opt._optimizer_step_pre_hooks


def test_norm_affine_trains_only_the_norms() -> None:
    model = _model(trainable="norm_affine")
    groups = _task().parameter_groups(model, 0.1)
    trained = {id(p) for g in groups for p in g["params"]}
    norms = norm_affine_parameters(model)
    assert trained == {id(p) for p in norms} and all(g["weight_decay"] == 0.0 for g in groups)
    assert all(p.requires_grad == (id(p) in trained) for p in model.parameters())
    assert not model.head.weight.requires_grad  # the classifier stays at its random init too


def test_random_match_moves_exactly_as_many_conv_entries_as_the_norms_have() -> None:
    model = _model(trainable="random_match")
    count = sum(p.numel() for p in norm_affine_parameters(model))
    groups = _task().parameter_groups(model, 0.1)
    opt = torch.optim.AdamW(groups, lr=0.1)
    before = [p.detach().clone() for g in groups for p in g["params"]]
    model(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])).loss.backward()
    opt.step()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip((p for g in groups for p in g["params"]), before))
    assert 0 < changed <= count and count - changed < count // 10  # a few picked entries may have a zero gradient
    assert all(not p.requires_grad for p in norm_affine_parameters(model))


def test_gamma_init_uniform_draws_gamma_in_unit_interval_and_zero_beta() -> None:
    model = _model(gamma_init="uniform")
    bn = model.stem_norm
    w = bn.weight.detach()
    assert 0.0 <= float(w.min()) and float(w.max()) <= 1.0 and float(w.std()) > 0
    assert float(bn.bias.detach().abs().max()) == 0.0


def test_scalar_lr_factor_puts_one_element_parameters_in_a_scaled_group() -> None:
    model = _model(norm="none", variant="fixup", scalar_lr_factor=0.1)
    groups = _task().parameter_groups(model, 0.1)
    scaled = [g for g in groups if g.get("lr_scale") == 0.1]
    assert len(scaled) == 1 and scaled[0]["params"] and all(p.numel() == 1 for p in scaled[0]["params"])
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one group


def test_agc_clipping_attaches_a_step_pre_hook_that_clips() -> None:
    model = _model(norm="none", variant="nf", agc_clipping=0.01)
    task = _task()
    opt = torch.optim.SGD(task.parameter_groups(model, 0.0), lr=1.0)
    task.prepare_optimizer(opt, model)
    conv = model.stem_conv.weight
    conv.grad = torch.full_like(conv, 1e6)
    before = conv.detach().clone()
    opt.step()
    step = (conv.detach() - before).flatten(1).norm(dim=1)
    assert float(step.max()) < 1.0  # clipped to about 1% of the unit's norm, not 1e6 per element


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"trainable": "bn"}, r"trainable in \('all', 'norm_affine', 'random_match'\), got 'bn'"),
        ({"gamma_init": "ones"}, r"gamma_init in \('default', 'uniform'\), got 'ones'"),
        ({"agc_clipping": -1.0}, r"agc_clipping to be a number >= 0, got -1.0"),
        ({"scalar_lr_factor": 0}, r"scalar_lr_factor to be a number > 0, got 0"),
        ({"image_size": 4}, r"image_size to be an int >= 8, got 4"),
        ({"trainable": "norm_affine", "norm": "none", "variant": "fixup"}, r"needs variant='standard'"),
    ],
)
def test_vision_config_rejects_bad_fields(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VisionResNetConfig(**kw)


def test_norm_none_means_norm_free() -> None:
    assert VisionResNetConfig(norm="none", variant="nf").norm is None


def test_appearance_shift_is_deterministic_and_a_per_channel_affine_map() -> None:
    x = torch.rand(5, 3, 8, 8) - 0.5
    y = appearance_shift(x, seed=3)
    assert torch.equal(y, appearance_shift(x, seed=3)) and not torch.allclose(y, x)
    # per image and channel an affine map: instance normalization removes it (IBN-Net's premise)
    inorm = nn.InstanceNorm2d(3, eps=1e-12)
    torch.testing.assert_close(inorm(y), inorm(x), atol=1e-4, rtol=1e-4)


def test_training_loop_honours_lr_scale_and_calls_prepare_optimizer(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    calls: list[int] = []

    class Frozen(DigitsResNetTask):
        def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
            return [dict(g, lr_scale=0.0) for g in super().parameter_groups(model, weight_decay)]

        def prepare_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
            calls.append(len(optimizer.param_groups))

    monkeypatch.setitem(tasks_mod.TASK_CLASSES, "digits_resnet", Frozen)
    run_suite(parse_suite(json.loads(json.dumps(TINY_VISION))), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "rows.jsonl").read_text().splitlines()]
    losses = [r["value"] for r in rows if r["kind"] == "eval" and r["metric"] == "val_loss"]
    assert calls == [2] and len(losses) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-6)
    lrs = [r["value"] for r in rows if r["kind"] == "train" and r["metric"] == "lr"]
    assert lrs and all(v > 0 for v in lrs)  # the schedule ran; the groups' rates were scaled to zero


def test_claims_accept_a_tasks_extra_eval_metric_and_refuse_unknown_ones() -> None:
    cfg = load_suite("style_shift")
    base = {"id": "c", "text": "t", "paper": "p", "url": "https://x", "a": "ibn", "relation": "greater", "b": "bn"}
    metrics = task_class("style_shift").eval_metrics
    claims, problems = parse_claims([dict(base, metric="final_shift_acc")], cfg, metrics)
    assert problems == [] and claims[0].metric == "final_shift_acc"
    _, problems = parse_claims([dict(base, metric="final_shift_acc")], cfg, DigitsResNetTask.eval_metrics)
    assert len(problems) == 1 and "unknown metric 'final_shift_acc'" in problems[0]
    rows = [{"arm": "ibn", "seed": 0, "step": s, "kind": "eval", "metric": "shift_acc", "value": v}
            for s, v in ((0, 0.1), (5, 0.7))]
    assert arm_values(rows, "ibn", "final_shift_acc", statuses={0: "ok", 1: "diverged"}) == {0: 0.7, 1: -math.inf}


def test_style_shift_task_reports_clean_and_shifted_metrics() -> None:
    data = dict(json.loads(json.dumps(TINY_VISION)), task="style_shift")
    cfg = parse_suite(data)
    task = StyleShiftTask(cfg, DistInfo(), torch.device("cpu"))
    metrics = task.evaluate(_model(norm="instance_norm", norm_kwargs={"affine": True}))
    assert set(metrics) == {"val_loss", "val_acc", "shift_loss", "shift_acc"}
    assert all(math.isfinite(v) for v in metrics.values())


def _smoke(name: str, tmp_path: Path) -> str:
    argv = ["lab", "--suite", name, "--scale", "smoke", "--out", str(tmp_path / name), "--no-progress",
            "--threads", "1"]
    assert main(argv) == 0
    return (tmp_path / name / "report.md").read_text()


@pytest.mark.parametrize("name", ["microbatch", "bn_only", "style_shift"])
def test_vision_suite_smoke_runs_end_to_end(name: str, tmp_path: Path) -> None:
    report = _smoke(name, tmp_path)  # 4-14 s each on one thread
    cfg = load_suite(name)
    assert "## Claims" in report and all(f"**{c.id}**" in report for c in cfg.claims)
    assert "error" not in report.split("## Claims")[0]
    if name == "style_shift":
        assert "final shift acc" in report
