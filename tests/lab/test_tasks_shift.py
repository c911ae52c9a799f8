"""The shift tasks (``tta``, ``federated``): the FedAvg round (weights averaged, FedBN's norms kept local), the
TTA grid's metric names, the suite-wide protocol, the claims on ``eval:`` metrics and ``b_metric``, and the
packaged ``tta`` / ``tta_norms`` / ``federated`` suites end to end at the smoke scale (slow)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from normlab.cli import main
from normlab.lab.claims import VERDICTS, evaluate_claims
from normlab.lab.config import SuiteError, load_suite, parse_suite
from normlab.lab.dist import DistInfo
from normlab.lab.schema import make_row
from normlab.lab.tasks_shift import FedClients, FedConfig, FederatedTask, ShiftCNNConfig, TTATask, fedavg_, label_tag
from normlab.models.resnet import ResNet, ResNetConfig


def _fed(local_norms: bool) -> FedClients:
    torch.manual_seed(0)
    fed = FedClients(ResNet(ResNetConfig(depth=8, width=4)), 3, local_norms)
    with torch.no_grad():  # make the clients differ: client k's every entry + k
        for k, client in enumerate(fed.clients):
            for t in client.state_dict().values():
                t.add_(k)
    return fed


def test_fedavg_averages_every_entry_of_every_client() -> None:
    fed = _fed(local_norms=False)
    before = [copy.deepcopy(c.state_dict()) for c in fed.clients]
    fedavg_(fed)
    for name, t in fed.clients[0].state_dict().items():
        mean = sum(s[name].double() for s in before) / 3
        mean = mean.round() if not t.is_floating_point() else mean
        for c in fed.clients:
            torch.testing.assert_close(c.state_dict()[name].double(), mean.double())


def test_fedbn_keeps_norm_parameters_and_statistics_local() -> None:
    fed = _fed(local_norms=True)
    before = [copy.deepcopy(c.state_dict()) for c in fed.clients]
    fedavg_(fed)
    from normlab.nn.batch_norm import BatchNorm

    norms = {n for n, m in fed.clients[0].named_modules() if isinstance(m, BatchNorm)}
    assert fed.local == {k for k in before[0] if k.rsplit(".", 1)[0] in norms}
    assert any(k.endswith("running_mean") for k in fed.local) and any(k.endswith("weight") for k in fed.local)
    conv = next(k for k in before[0] if "conv" in k and k.endswith("weight") and k not in fed.local)
    for k, c in enumerate(fed.clients):
        state = c.state_dict()
        for name in fed.local:
            torch.testing.assert_close(state[name], before[k][name])  # untouched
        torch.testing.assert_close(state[conv], (before[0][conv] + before[1][conv] + before[2][conv]) / 3)


def test_fed_clients_loss_is_the_client_mean_and_each_step_uses_the_clients_own_gradient() -> None:
    fed = _fed(local_norms=False).eval()
    x, y = torch.rand(3, 2, 3, 16, 16), torch.tensor([[0, 1], [2, 3], [4, 5]])
    own = []
    for k, c in enumerate(fed.clients):
        c.zero_grad()
        c(x[k], labels=y[k]).loss.backward()
        own.append([p.grad.clone() for p in c.parameters()])
    fed.zero_grad()
    loss = fed(x, y).loss
    loss.backward()
    FederatedTask.__new__(FederatedTask).before_step(fed, 1)
    for k, c in enumerate(fed.clients):
        for g, p in zip(own[k], c.parameters()):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        expected = sum(float(c(x[k], labels=y[k]).loss) for k, c in enumerate(fed.clients)) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"expected x of shape \(K=3"):
        fed(torch.rand(2, 2, 3, 16, 16), y[:2])
    with pytest.raises(ValueError, match="num_clients"):
        FedClients(ResNet(ResNetConfig(depth=8, width=4)), 0)


def test_federated_task_aggregates_at_round_ends_only() -> None:
    cfg = FedConfig(width=4, corruptions=["gaussian_noise", "contrast"], local_steps=3)
    fed = FederatedTask.build(cfg)
    assert isinstance(fed, FedClients)
    with torch.no_grad():
        next(fed.clients[1].parameters()).add_(1.0)
    task = FederatedTask.__new__(FederatedTask)  # the hooks need no data
    task.after_step(fed, 2)
    assert not torch.equal(next(fed.clients[0].parameters()), next(fed.clients[1].parameters()))
    task.after_step(fed, 3)
    assert torch.equal(next(fed.clients[0].parameters()), next(fed.clients[1].parameters()))


def test_fedwon_config_is_a_norm_free_scaled_ws_net() -> None:
    cfg = FedConfig.from_dict({"variant": "nf", "norm": "none", "agc_clip": 0.1})
    assert cfg.norm is None and cfg.net().variant == "nf"
    with pytest.raises(ValueError, match="agc_clip"):
        FedConfig(agc_clip=-1.0)
    with pytest.raises(ValueError, match="local_steps"):
        FedConfig(local_steps=0)
    with pytest.raises(ValueError, match="corruptions"):
        FedConfig(corruptions=["fog_of_war"])


def test_shift_cnn_config_checks_the_protocol() -> None:
    assert label_tag("dirichlet:0.01") == "dir0.01" and label_tag("iid") == "iid"
    for bad, key in (({"label_orders": ["sorted"]}, "label_orders"), ({"methods": ["bn_adapt"]}, "methods"),
                     ({"severities": [6]}, "severities"), ({"test_batch_sizes": []}, "test_batch_sizes")):
        with pytest.raises(ValueError, match=key):
            ShiftCNNConfig(**bad)


def _suite(**model: Any) -> dict[str, Any]:
    return {"name": "t", "task": "tta", "steps": 4, "batch_size": 8, "warmup_steps": 0, "eval_every": 2,
            "seeds": [0, 1], "diagnostics": [],
            "model": {"channels": [4, 4], "corruptions": ["contrast"], "severities": [5], "label_orders": ["iid"],
                      "test_batch_sizes": [64], **model},
            "arms": [{"name": "bn"}, {"name": "gn", "norm": "group_norm", "norm_kwargs": {"num_groups": 2}}]}


def _claim(**kw: Any) -> dict[str, Any]:
    return {"id": "c", "text": "t", "paper": "P 2021", "url": "https://arxiv.org/abs/0", "a": "bn", "b": "bn",
            "relation": "less", "metric": "eval:err_tbn_iid_b64_s5", **kw}


def test_protocol_is_suite_wide_and_claims_name_its_metrics() -> None:
    data = _suite()
    data["arms"][1]["severities"] = [3]
    data["claims"] = [_claim(b_metric="eval:err_source_iid_b64_s5"), _claim(id="d", metric="eval:err_tbn_iid_b16_s5",
                                                                           b_metric="eval:err_source_iid_b64_s5"),
                      _claim(id="e", b_metric="eval:err_tbn_iid_b64_s5")]
    with pytest.raises(SuiteError) as info:
        parse_suite(data)
    text = str(info.value)
    assert "severities: the protocol is suite-wide" in text
    assert "claims[1] (d): metric 'eval:err_tbn_iid_b16_s5': the task records no eval metric" in text
    assert "claims[2] (e): a and b: arm 'bn' is compared with itself on the same metric" in text
    assert "claims[0]" not in text


def test_b_metric_claim_compares_two_metrics_of_one_arm() -> None:
    data = _suite()
    data["claims"] = [_claim(b_metric="eval:err_source_iid_b64_s5")]
    cfg = parse_suite(data)
    assert cfg.claims[0].statement() == "bn[eval:err_tbn_iid_b64_s5] < bn[eval:err_source_iid_b64_s5]"
    rows = []
    for seed, (tbn, src) in enumerate(((20.0, 50.0), (22.0, 51.0))):
        rows += [make_row("bn", seed, 4, "eval", "err_tbn_iid_b64_s5", tbn),
                 make_row("bn", seed, 4, "eval", "err_source_iid_b64_s5", src),
                 make_row("bn", seed, 4, "status", "status", None, status="ok")]
    (result,) = evaluate_claims(cfg, rows)
    assert result.verdict == "held" and result.comparisons[0].diff == pytest.approx(-29.5)
    assert parse_suite(cfg.to_dict()).claims[0].b_metric == "eval:err_source_iid_b64_s5"


def test_tta_grid_names_every_metric_and_skips_what_a_net_cannot_adapt() -> None:
    cfg = parse_suite(_suite(label_orders=["iid", "dirichlet:0.1"], test_batch_sizes=[64, 16]))
    task = TTATask(cfg, DistInfo(), torch.device("cpu"))
    bn = TTATask.build_model(cfg.arm_model(cfg.arms[0]))
    out = task.final_evaluate(bn)
    assert set(out) <= set(TTATask.claim_metrics(cfg))
    assert {"err_tbn_dir0.1_b16_s5", "err_rotta_rbn_iid_b64_s5_contrast", "layers_tent"} <= set(out)
    assert out["layers_tbn"] == 2 and 0 <= out["err_source_iid_b64_s5"] <= 100
    gn = TTATask.build_model(cfg.arm_model(cfg.arms[1]))
    out = task.final_evaluate(gn)
    assert out["layers_tbn"] == 0 and "err_tbn_iid_b64_s5" not in out  # GroupNorm has no batch statistics
    assert out["layers_tent"] == 2 and "err_tent_iid_b64_s5" in out  # but an affine for TENT


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["tta", "tta_norms", "federated"])
def test_shift_suites_smoke_scale_end_to_end(suite: str, tmp_path: Path) -> None:
    out = tmp_path / suite
    assert main(["lab", "--suite", suite, "--scale", "smoke", "--out", str(out), "--no-progress",
                 "--threads", "1", "--seeds", "0,1"]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    claims = md[md.index("## Claims"):md.index("## Diagnosis")]
    for claim in load_suite(suite).claims:
        line = next(ln for ln in claims.splitlines() if f"**{claim.id}**" in ln)
        assert line.rstrip(" |").split(" | ")[-1].split(" (")[0] in VERDICTS
