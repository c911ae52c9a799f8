"""adapt()'s safety (caller's model untouched, reset bitwise, errors by message), its choice of layers and the hand
examples of the methods."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from normlab.models import CNNConfig, DigitsCNN
from normlab.nn import BatchNorm, RepBatchNorm
from normlab.tta import METHODS, adapt, plan
from tests.tta._reference import RefTBN, ref_tent, ref_tent_step, swap_bns
from tests.tta.conftest import CONV_MODELS, D, batches, randomize

TOL = {"rtol": 1e-9, "atol": 1e-10}


def snapshot(model: nn.Module) -> tuple[dict[str, Tensor], list[bool], list[bool]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def assert_unchanged(model: nn.Module, snap: tuple[dict[str, Tensor], list[bool], list[bool]]) -> None:
    state, modes, grads = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_name", list(CONV_MODELS))
def test_caller_model_untouched_and_reset_is_bitwise(method: str, model_name: str) -> None:
    source = CONV_MODELS[model_name]()
    snap = snapshot(source)
    tta = adapt(source, method, seed=0) if method == "unmix_tns" else adapt(source, method)
    x1, x2 = batches()
    first = tta(x1)
    second = tta(x2)
    assert_unchanged(source, snap)
    tta.reset()
    for k, v in tta.model.state_dict().items():
        assert torch.equal(v, snap[0][k]), k
    assert torch.equal(tta(x1), first)  # same state as at adapt time: optimizer state, components included
    assert torch.equal(tta(x2), second)


def test_inplace_adapts_the_callers_model_and_remove_undoes_it() -> None:
    source = CONV_MODELS["resnet_normlab_bn"]()
    snap = snapshot(source)
    tta = adapt(source, "tent", inplace=True)
    assert tta.model is source
    tta(batches(1)[0])
    assert not torch.equal(source.stem_norm.weight, snap[0]["stem_norm.weight"])
    assert tta.remove() is source
    assert_unchanged(source, snap)


def test_source_is_the_eval_model() -> None:
    source = CONV_MODELS["digits_torch_bn2d"]()
    x = batches(1)[0]
    tta = adapt(source, "source")
    assert tta.adapted == [] and set(tta.skipped) == {"norms.0", "norms.1", "norms.2"}
    with torch.no_grad():
        assert torch.equal(tta(x), source(x).logits)


def test_one_image_batch_of_a_conv_net_uses_spatial_statistics() -> None:
    source = CONV_MODELS["digits_torch_bn2d"]()
    x = batches(1, size=1)[0]
    with torch.no_grad():
        expected = swap_bns(source, lambda n, bn: RefTBN(bn))(x).logits
    torch.testing.assert_close(adapt(source, "tbn")(x), expected, **TOL)


def _bn1d_head() -> nn.Module:
    return randomize(nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)))


@pytest.mark.parametrize("method", ["tbn", "alpha_bn", "tent"])
def test_one_value_per_channel_is_an_error(method: str) -> None:
    tta = adapt(_bn1d_head(), method)
    with pytest.raises(ValueError, match=rf"{method}: layer '2' takes its test-batch statistics over 1 value\(s\) per "
                                          r"channel from an input of size \[1, 6\]; expected at least 2"):
        tta(torch.randn(1, 1, 8, 8, dtype=D))
    assert tta(torch.randn(2, 1, 8, 8, dtype=D)).shape == (2, 3)


def test_batch_norm_1d_on_n_c_input() -> None:
    """TBN adapts BatchNorm1d (the official codes leave it on source statistics); UnMix-TNS has no instance statistics
    for an (N, C) input and uses the source statistics, as the official BatchNorm1d replacement."""
    source = _bn1d_head()
    x = torch.randn(5, 1, 8, 8, dtype=D)
    assert adapt(source, "tbn").adapted == ["2"]
    tta = adapt(source, "unmix_tns", seed=0)
    before = {k: v.clone() for k, v in tta.layer_state("2").items()}
    with torch.no_grad():
        torch.testing.assert_close(tta(x), source(x), **TOL)
    for k, v in tta.layer_state("2").items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_is_an_error(method: str) -> None:
    tta = adapt(CONV_MODELS["resnet_normlab_bn"](), method)
    with pytest.raises(ValueError, match=rf"{method}: expected a non-empty batch, got input of size \[0, 1, 8, 8\]"):
        tta(torch.zeros(0, 1, 8, 8, dtype=D))


def test_tent_without_an_affine_names_the_norms() -> None:
    model = DigitsCNN(CNNConfig(channels=[4, 4], norm="batch_norm", norm_kwargs={"affine": False}))
    with pytest.raises(ValueError, match=r"tent: DigitsCNN has no norm with an affine parameter \(weight/bias\) to "
                                         r"train; its norms: norms\.0 \(batch_norm\): adapted: test-batch statistics; "
                                         r"norms\.1 \(batch_norm\)"):
        adapt(model, "tent")
    with pytest.raises(ValueError, match=r"tent: Sequential has no norms \(normlab.iter_norms found none\)"):
        adapt(nn.Sequential(nn.Linear(3, 3)), "tent")


def test_statistic_method_with_nothing_to_adapt_lists_the_norms() -> None:
    model = DigitsCNN(CNNConfig(channels=[4], norm="group_norm", norm_kwargs={"num_groups": 2}))
    with pytest.raises(ValueError, match=r"tbn: DigitsCNN has no norm it can adapt; its norms: norms\.0 \(group_norm\)"
                                         r": skipped: per-sample statistics \(not batch-dependent\)"):
        adapt(model, "tbn")
    assert adapt(model, "tent").adapted == ["norms.0"]  # GroupNorm's affine


def test_bad_arguments() -> None:
    model = CONV_MODELS["resnet_normlab_bn"]()
    with pytest.raises(ValueError, match=r"adapt: expected method to be one of source, tbn, alpha_bn, tent, unmix_tns, "
                                         r"rotta_rbn, got 'bn_adapt'"):
        adapt(model, "bn_adapt")
    with pytest.raises(TypeError, match=r"adapt: method 'alpha_bn' got unknown option\(s\) lr; its options: alpha"):
        adapt(model, "alpha_bn", lr=0.1)
    with pytest.raises(TypeError, match=r"adapt: method 'tbn' got unknown option\(s\) alpha; its options: none"):
        adapt(model, "tbn", alpha=0.1)
    with pytest.raises(TypeError, match=r"adapt: expected model to be a torch.nn.Module, got dict"):
        adapt({}, "tbn")  # type: ignore[arg-type]
    bad = [("alpha_bn", {"alpha": 1.5}, r"alpha_bn: expected alpha in \[0, 1\], got 1.5"),
           ("rotta_rbn", {"momentum": -0.1}, r"rotta_rbn: expected momentum in \[0, 1\], got -0.1"),
           ("unmix_tns", {"num_components": 0}, r"unmix_tns: expected num_components to be an int >= 1, got 0"),
           ("unmix_tns", {"temperature": 0}, r"unmix_tns: expected temperature > 0, got 0"),
           ("unmix_tns", {"alpha_init": 1.0}, r"unmix_tns: expected alpha_init < 1 with num_components > 1"),
           ("unmix_tns", {"batch_size_max": 2.0}, r"unmix_tns: expected batch_size_max to be an int >= 1, got 2.0"),
           ("tent", {"lr": 0}, r"tent: expected lr to be a number > 0, got 0"),
           ("tent", {"steps": 0}, r"tent: expected steps to be an int >= 1, got 0"),
           ("tent", {"optimizer": "rmsprop"}, r"tent: expected optimizer to be 'adam', 'sgd' or a callable"),
           ("tent", {"betas": (0.9,)}, r"tent: expected betas to be two numbers in \[0, 1\), got \(0.9,\)")]
    for method, options, message in bad:
        with pytest.raises(ValueError, match=message):
            adapt(model, method, **options)
    with pytest.raises(TypeError, match=r"unmix_tns: expected seed to be an int or None, got str"):
        adapt(model, "unmix_tns", seed="1")
    with pytest.raises(TypeError, match=r"tent: expected episodic to be a bool, got str"):
        adapt(model, "tent", episodic="yes")
    with pytest.raises(TypeError, match=r"tent: expected optimizer\(params\) to return a torch.optim.Optimizer"):
        adapt(model, "tent", optimizer=lambda params: None)
    tta = adapt(model, "tbn")
    with pytest.raises(KeyError, match=r"Adapted.layer_state: 'head' is not an adapted layer"):
        tta.layer_state("head")
    with pytest.raises(TypeError, match=r"tbn: expected a test batch \(a tensor argument for the model\), got none"):
        tta()


def test_model_output_without_logits_is_an_error() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"scores": self.bn(x)}

    with pytest.raises(TypeError, match=r"adapt: expected the model to return logits .* got dict; pass logits="):
        adapt(Odd(), "tbn")(torch.randn(4, 3))
    assert adapt(Odd(), "tbn", logits=lambda out: out["scores"])(torch.randn(4, 3)).shape == (4, 3)


def _mixed_net() -> nn.Module:
    return randomize(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), BatchNorm(4, track_running_stats=False),
        RepBatchNorm(4, channel_dim=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3), nn.LayerNorm(3),
    ))


def test_layers_are_chosen_by_traits_with_reasons() -> None:
    net = _mixed_net()
    tbn = {c.name: c for c in plan(net, "tbn")}
    assert [n for n, c in tbn.items() if c.adapted] == ["1", "4"]
    assert "per-sample statistics" in tbn["2"].detail and "per-sample statistics" in tbn["8"].detail
    assert "no running statistics (track_running_stats=False)" in tbn["3"].detail
    for method in ("alpha_bn", "unmix_tns", "rotta_rbn"):
        choices = {c.name: c for c in plan(net, method)}
        assert [n for n, c in choices.items() if c.adapted] == ["1"], method
        assert "RepBN's αx" in choices["4"].detail
    tent = adapt(net, "tent")
    assert tent.adapted == ["1", "2", "3", "4", "8"]
    trainable = {n for n, p in tent.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{w}" for i in (1, 2, 3, 4, 8) for w in ("weight", "bias")}  # RepBN's alpha stays
    assert "tent: 5 of 5 norms adapted" in tent.summary()


def test_repbn_under_tbn_uses_batch_statistics() -> None:
    net = _mixed_net()
    x = batches(1)[0]
    rep = copy.deepcopy(net[4]).train()
    with torch.no_grad():
        h = net[3](net[2](adapt(net[:2], "tbn").model(x)))
        torch.testing.assert_close(adapt(net[:5], "tbn")(x), rep(h), **TOL)


def test_token_batch_norm_with_a_padding_mask() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = BatchNorm(3, channel_dim=-1)

        def forward(self, x: Tensor, mask: Tensor) -> Tensor:
            return self.bn(x, mask=mask)

    net = randomize(Tokens())
    x = torch.randn(2, 5, 3, dtype=D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    valid = x[mask]  # (8, 3)
    rm, rv, w, b = net.bn.running_mean, net.bn.running_var, net.bn.weight, net.bn.bias
    expected = {
        "tbn": (valid - valid.mean(0)) / torch.sqrt(valid.var(0, unbiased=False) + 1e-5) * w + b,
        "alpha_bn": (valid - (0.9 * rm + 0.1 * valid.mean(0))) / torch.sqrt(0.9 * rv + 0.1 * valid.var(0) + 1e-5) * w
        + b,
    }
    for method, want in expected.items():
        torch.testing.assert_close(adapt(net, method)(x, mask)[mask], want, **TOL)
    one = torch.zeros(2, 5, dtype=torch.bool)
    one[0, 0] = True
    with pytest.raises(ValueError, match=r"tbn: layer 'bn' takes its test-batch statistics over 1 value\(s\) per "
                                         r"channel from an input of size \[2, 5, 3\] with its mask"):
        adapt(net, "tbn")(x, one)


def test_alpha_bn_hand_example() -> None:
    """μ_src = 0, σ²_src = 1, test mean 2 and unbiased variance 4, α = 0.1 -> μ = 0.2, σ² = 1.3."""
    bn = nn.BatchNorm1d(1).double().eval()
    x = torch.tensor([[2 - math.sqrt(2)], [2 + math.sqrt(2)]], dtype=D)
    torch.testing.assert_close(adapt(bn, "alpha_bn")(x), (x - 0.2) / math.sqrt(1.3 + 1e-5), **TOL)


def test_unmix_tns_hand_example() -> None:
    """K=2, C=2, B=2, τ=0.07: components [1,0] and [0,1] (variance 1); instance means [2,0.1] and [0.1,2], instance
    variance 0.5 -> sample 1 normalized with μ̄ = [1, 0.55], σ̄² = [1.75, 0.9525]; λ = 0.1 moves μ_1 to [1.05, 0.005]
    and the variances to 0.975."""
    bn = nn.BatchNorm1d(2).double().eval()
    tta = adapt(bn, "unmix_tns", num_components=2, batch_size_max=2)
    layer = tta.layers[""]
    layer.mean_components = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    layer.var_components = torch.ones(2, 2, dtype=D)
    s = math.sqrt(0.5)
    means = torch.tensor([[2.0, 0.1], [0.1, 2.0]], dtype=D)
    x = means[:, :, None] + torch.tensor([-s, s], dtype=D)  # (2, 2, 2): instance variance 0.5
    y = tta(x)
    p = torch.softmax(torch.tensor([0.99875234, 0.04993762]) / 0.07, 0)[0].item()
    assert p == pytest.approx(1 - 1.3e-6, abs=1e-7)
    torch.testing.assert_close(y[0], (x[0] - torch.tensor([[1.0], [0.55]], dtype=D))
                               / torch.sqrt(torch.tensor([[1.75], [0.9525]], dtype=D) + 1e-5), rtol=0, atol=2e-5)
    state = tta.layer_state("")
    torch.testing.assert_close(state["mean_components"], torch.tensor([[1.05, 0.005], [0.005, 1.05]], dtype=D),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(state["var_components"], torch.full((2, 2), 0.975, dtype=D), rtol=0, atol=1e-6)


def test_unmix_momentum_scales_with_batch_size() -> None:
    tta = adapt(CONV_MODELS["resnet_normlab_bn"](), "unmix_tns")
    layer = tta.layers["stem_norm"]
    assert layer.momentum(64) == pytest.approx(0.1)
    assert layer.momentum(1) == pytest.approx(0.001645, abs=1e-6)


def test_tent_sgd_episodic_and_model_train() -> None:
    source = CONV_MODELS["digits_torch_bn2d"]()
    x1, x2 = batches()
    tta = adapt(source, "tent", optimizer="sgd", lr=0.01)
    ref, opt = ref_tent(source)
    opt = torch.optim.SGD(opt.param_groups[0]["params"], lr=0.01, momentum=0.9, dampening=0, nesterov=True)
    for x in (x1, x2):
        torch.testing.assert_close(tta(x), ref_tent_step(ref, opt, x), **TOL)
    episodic = adapt(source, "tent", episodic=True)
    first = episodic(x1)
    assert torch.equal(episodic(x1), first)
    assert adapt(source, "tent", model_train=True).model.training
    assert not adapt(source, "tent").model.training
