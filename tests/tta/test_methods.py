"""Each method against a re-implementation of its official code (tests/tta/_reference.py): predictions, adapted
parameters and updated statistics after one and two online steps, on conv nets with ``torch.nn.BatchNorm2d`` and with
normlab's BatchNorm, and on a ViT with token BatchNorm / LayerNorm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from normlab import iter_norms
from normlab.models import TransformerConfig, ViTEncoder
from normlab.tta import adapt
from tests.tta._reference import (
    BN_TYPES,
    RefAlphaBN,
    RefRBN,
    RefTBN,
    RefUnMix,
    ref_tent,
    ref_tent_step,
    swap_bns,
    unmix_init,
)
from tests.tta.conftest import CONV_MODELS, batches, randomize, vit

TOL = {"rtol": 1e-9, "atol": 1e-10}


def logits(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


def bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BN_TYPES)]


def ref_step(ref: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return logits(ref(x))


def assert_stats_match(adapted: nn.Module, ref: nn.Module, names: list[str]) -> None:
    for name in names:
        ours, theirs = adapted.get_submodule(name), ref.get_submodule(name).bn
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, buf), getattr(theirs, buf), **TOL, msg=f"{name}.{buf}")


STAT_REFS: dict[str, tuple[dict[str, Any], Callable[[str, nn.Module], nn.Module]]] = {
    "tbn": ({}, lambda n, bn: RefTBN(bn)),
    "alpha_bn": ({}, lambda n, bn: RefAlphaBN(bn, 0.1)),
    "rotta_rbn": ({}, lambda n, bn: RefRBN(bn, 0.05)),
    "alpha_bn-0.3": ({"alpha": 0.3}, lambda n, bn: RefAlphaBN(bn, 0.3)),
    "rotta_rbn-0.2": ({"momentum": 0.2}, lambda n, bn: RefRBN(bn, 0.2)),
}


@pytest.mark.parametrize("model_name", list(CONV_MODELS))
@pytest.mark.parametrize("case", list(STAT_REFS))
def test_statistic_methods_match_official_two_steps(model_name: str, case: str) -> None:
    source = CONV_MODELS[model_name]()
    options, wrap = STAT_REFS[case]
    method = case.split("-")[0]
    tta = adapt(source, method, **options)
    ref = swap_bns(source, wrap)
    names = bn_names(source)
    assert tta.adapted == names
    for x in batches():
        torch.testing.assert_close(tta(x), ref_step(ref, x), **TOL)
        assert_stats_match(tta.model, ref, names)
    # the statistics really moved (tbn, rbn) or really stayed (alpha_bn)
    first = names[0]
    moved = not torch.equal(tta.model.get_submodule(first).running_mean, source.get_submodule(first).running_mean)
    assert moved == (method in ("tbn", "rotta_rbn"))


@pytest.mark.parametrize("model_name", list(CONV_MODELS))
@pytest.mark.parametrize("k", [16, 1])
def test_unmix_tns_matches_official_two_steps(model_name: str, k: int) -> None:
    source = CONV_MODELS[model_name]()
    tta = adapt(source, "unmix_tns", num_components=k, seed=3)
    names = bn_names(source)
    g = torch.Generator().manual_seed(3)
    inits = {}
    for name in names:  # the layers draw their noise in model order from one seeded generator
        bn = source.get_submodule(name)
        noise = torch.randn(k, bn.num_features, generator=g).double() if k > 1 else None
        inits[name] = unmix_init(bn, k, 0.5, noise)
        torch.testing.assert_close(tta.layer_state(name)["mean_components"], inits[name][0], **TOL)
        torch.testing.assert_close(tta.layer_state(name)["var_components"], inits[name][1], **TOL)
    ref = swap_bns(source, lambda n, bn: RefUnMix(bn, *inits[n]))
    for x in batches(size=4):
        torch.testing.assert_close(tta(x), ref_step(ref, x), **TOL)
        for name in names:
            state = tta.layer_state(name)
            torch.testing.assert_close(state["mean_components"], ref.get_submodule(name).mu, **TOL)
            torch.testing.assert_close(state["var_components"], ref.get_submodule(name).var, **TOL)
    # the running buffers are not UnMix-TNS's state: untouched
    assert_same_state(tta.model, source)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("model_name", list(CONV_MODELS))
def test_tent_matches_official_two_steps(model_name: str) -> None:
    source = CONV_MODELS[model_name]()
    tta = adapt(source, "tent")
    ref, opt = ref_tent(source)
    xs = batches()
    before = {n: p.detach().clone() for n, p in tta.model.named_parameters()}
    for x in xs:
        theirs = ref_tent_step(ref, opt, x)
        torch.testing.assert_close(tta(x), theirs, **TOL)
        ours_params = dict(tta.model.named_parameters())
        for name, p in ref.named_parameters():
            torch.testing.assert_close(ours_params[name], p, **TOL, msg=name)
    trained = {n for n, p in tta.model.named_parameters() if not torch.equal(p, before[n])}
    assert trained == {n for n, p in ref.named_parameters() if p.requires_grad}
    assert trained and all(n.rsplit(".", 1)[-1] in ("weight", "bias") for n in trained)
    # Tent normalizes with batch statistics and leaves the running buffers as they were (the official code drops them)
    buffers = dict(source.named_buffers())
    for name, buf in tta.model.named_buffers():
        assert torch.equal(buf, buffers[name]), name


def test_tent_first_prediction_is_before_the_update() -> None:
    """The returned predictions come from the forward that gave the loss: the first equals TBN's (source affine)."""
    source = CONV_MODELS["resnet_normlab_bn"]()
    x = batches(1)[0]
    tent, tbn = adapt(source, "tent"), adapt(source, "tbn")
    torch.testing.assert_close(tent(x), tbn(x), **TOL)
    assert not torch.allclose(tent(x), tbn(x), **TOL)  # the second prediction sees the updated affine


@pytest.mark.parametrize("method", ["tbn", "alpha_bn", "rotta_rbn"])
def test_token_batch_norm_in_a_vit(method: str) -> None:
    source = vit("batch_norm")
    options, wrap = STAT_REFS[method]
    tta = adapt(source, method, **options)
    names = bn_names(source)
    assert names and tta.adapted == names
    assert all(source.get_submodule(n).channel_dim == -1 for n in names)
    ref = swap_bns(source, wrap)
    for x in batches(size=4):
        torch.testing.assert_close(tta(x), ref_step(ref, x), **TOL)
        assert_stats_match(tta.model, ref, names)


@pytest.mark.parametrize("norm", ["layer_norm", "batch_norm", "group_norm"])
def test_tent_on_a_vit(norm: str) -> None:
    source = vit(norm) if norm != "group_norm" else _vit_group_norm()
    tta = adapt(source, "tent")
    assert tta.adapted == [n for n, _, _ in iter_norms(source)]
    ref, opt = ref_tent(source)
    for x in batches(size=4):
        theirs = ref_tent_step(ref, opt, x)
        torch.testing.assert_close(tta(x), theirs, **TOL)
    ours = dict(tta.model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(ours[name], p, **TOL, msg=name)
        assert ours[name].requires_grad == p.requires_grad, name


def _vit_group_norm() -> nn.Module:
    cfg = TransformerConfig(d_model=8, n_layers=1, n_heads=2, image_size=8, patch_size=4, in_channels=1,
                            num_classes=5, norm="group_norm", norm_kwargs={"num_groups": 2})
    return randomize(ViTEncoder(cfg))


def _conv1d_bn1d() -> nn.Module:
    return randomize(nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
                                   nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3)))


def _conv3d_bn3d() -> nn.Module:
    return randomize(nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                                   nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3)))


@pytest.mark.parametrize("case", list(STAT_REFS) + ["unmix_tns"])
@pytest.mark.parametrize(("make", "shape"), [(_conv1d_bn1d, (1, 10)), (_conv3d_bn3d, (1, 3, 4, 4))])
def test_statistic_methods_on_batch_norm_1d_and_3d(case: str, make: Callable[[], nn.Module],
                                                   shape: tuple[int, ...]) -> None:
    """BatchNorm1d on (N, C, L) and BatchNorm3d are adapted like BatchNorm2d (the official codes patch only 2-d)."""
    source = make()
    method = case.split("-")[0]
    if method == "unmix_tns":
        tta = adapt(source, method, seed=0)
        noise = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)).double()
        ref = swap_bns(source, lambda n, bn: RefUnMix(bn, *unmix_init(bn, 16, 0.5, noise)))
    else:
        options, wrap = STAT_REFS[case]
        tta = adapt(source, method, **options)
        ref = swap_bns(source, wrap)
    assert tta.adapted == ["1"]
    for x in batches(size=3, shape=shape):
        torch.testing.assert_close(tta(x), ref_step(ref, x), **TOL)
    if method != "unmix_tns":
        assert_stats_match(tta.model, ref, ["1"])
