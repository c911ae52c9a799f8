"""LayerNorm removal by fine-tuning (Baroni et al. 2025): FakeLayerNorm's numbers, the preparation (exact), the
value-path split, σ̄ calibration, the staged schedule, the auxiliary loss, both exports (proven against the fixed-scale
model on real text) and the refusals, on Hugging Face GPT-2 and BERT (config-built) and normlab's trained DecoderLM.

Tolerances (float32 models): preparation is bit-exact; the fold export changes the arithmetic order, so logits agree
to 2e-5 relative to their largest magnitude; the Hugging Face form adds the relative var/2e12 of its eps.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from normlab.nn import FakeLayerNorm, LayerNorm
from normlab.surgery import (
    CenteredAffine,
    RemovalSchedule,
    SplitFakeLayerNorm,
    StdAuxLoss,
    calibrate_sigma,
    export_removed_ln,
    fold_ln_into_reader,
    prepare_ln_removal,
)
from normlab.surgery.ln_finetune import remove_ln_by_finetuning
from normlab.walk import iter_norms
from tests._extras import require
from tests.surgery._stream_models import gpt2, logits, text_ids, trained_decoder

pytestmark = pytest.mark.usefixtures("composite_norms")  # bit-exact claims: see tests/conftest.py

FOLD_RTOL = 2e-5


def bert(**overrides: Any) -> nn.Module:
    transformers = require("transformers", "hf")
    transformers.logging.set_verbosity_error()
    kw: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              vocab_size=260, max_position_embeddings=80, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**kw | overrides), add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).last_hidden_state.double()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------ FakeLayerNorm


def test_fixed_scale_matches_the_spec_vector_and_the_hf_form() -> None:
    # Hand-checked vector (x, σ̄ = 1.7, γ, β): the fixed-scale output and the γ·1e6/σ̄, eps 1e12 LayerNorm agree.
    x = torch.tensor([0.3, -1.2, 2.5, 0.4], dtype=torch.float64)
    m = FakeLayerNorm(4, sigma=1.7, fixed=True, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
        m.bias.copy_(torch.tensor([0.0, 0.1, 0.0, -0.1]))
    expected = torch.tensor([-0.1176471, -1.9, 0.5882353, -0.1588235], dtype=torch.float64)
    torch.testing.assert_close(m(x), expected, atol=1e-7, rtol=0)
    hf = nn.LayerNorm(4, eps=1e12, dtype=torch.float64)
    with torch.no_grad():
        hf.weight.copy_(m.weight * 1e6 / 1.7)
        hf.bias.copy_(m.bias)
    assert (hf(x) - m(x)).abs().max() < 1e-11  # the spec's 1.7e-12


def test_fixed_scale_then_folded_reader_matches_the_spec_vector() -> None:
    # TransformerLens layout W (d_in x d_out); with σ̄ = 2 and the norm gone, (x/σ̄) W'' + b' is the fake-LN path.
    x = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    gamma = torch.tensor([1.0, 2.0, 0.5, -1.0], dtype=torch.float64)
    beta = torch.tensor([0.1, 0.0, -0.2, 0.3], dtype=torch.float64)
    w_tl = torch.tensor([[1.0, 0.0], [2.0, 1.0], [-1.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([0.5, -0.5], dtype=torch.float64)
    fake = FakeLayerNorm(4, sigma=2.0, fixed=True, dtype=torch.float64)
    with torch.no_grad():
        fake.weight.copy_(gamma)
        fake.bias.copy_(beta)
    expected = torch.tensor([-2.29375, -0.20625], dtype=torch.float64)
    torch.testing.assert_close(fake(x) @ w_tl + b, expected)
    w2, b2 = fold_ln_into_reader(w_tl.T, b, gamma, beta, center=True)
    torch.testing.assert_close(w2.T, torch.tensor([[-0.125, 0.125], [2.875, 2.125], [-1.625, 0.625],
                                                         [-1.125, -2.875]], dtype=torch.float64))
    torch.testing.assert_close((x / 2.0) @ w2.T + b2, expected)


@pytest.mark.parametrize("cls", [nn.LayerNorm, LayerNorm])
def test_from_layer_norm_is_exact_in_real_mode(cls: type[nn.Module]) -> None:
    ln = cls(16, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_()  # type: ignore[operator]
        ln.bias.normal_()  # type: ignore[operator]
    fake = FakeLayerNorm.from_layer_norm(ln, sigma=3.0)
    x = torch.randn(2, 7, 16) * 5
    assert torch.equal(fake(x), ln(x))
    assert fake.eps == 1e-6 and float(fake.sigma) == 3.0 and not fake.fixed


def test_momentum_tracks_sigma_while_real_and_training_only() -> None:
    m = FakeLayerNorm(8, momentum=0.5)
    x = torch.randn(4, 5, 8) * 3
    m.eval()
    m(x)
    assert float(m.sigma) == 1.0
    m.train()
    m(x)
    expected = 0.5 * 1.0 + 0.5 * float((x.var(-1, unbiased=False) + 1e-5).sqrt().mean())
    assert float(m.sigma) == pytest.approx(expected, rel=1e-6)
    m.fixed = True
    m(x)
    assert float(m.sigma) == pytest.approx(expected, rel=1e-6)  # frozen once switched


def test_the_switch_is_saved_in_the_state_dict() -> None:
    m = FakeLayerNorm(8, sigma=2.0, fixed=True)
    fresh = FakeLayerNorm(8)
    fresh.load_state_dict(m.state_dict())
    assert fresh.fixed and float(fresh.sigma) == 2.0
    s = SplitFakeLayerNorm(8)
    s.fixed_v = True
    fresh_s = SplitFakeLayerNorm(8)
    fresh_s.load_state_dict(s.state_dict())
    assert fresh_s.fixed_v and not fresh_s.fixed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"sigma": 0.0}, r"expected sigma > 0, got 0.0"), ({"fixed": 1}, r"expected fixed to be a bool, got int"),
     ({"momentum": 2.0}, r"expected momentum in \[0, 1\] or None, got 2.0")],
)
def test_fake_layer_norm_refuses_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        FakeLayerNorm(4, **kwargs)


# ------------------------------------------------------------------------------------------------- preparation


def test_prepare_is_exact_and_orders_switches_as_the_paper_on_gpt2() -> None:
    model, ids = gpt2(), text_ids(2, 64, gpt2=True)
    removal = prepare_ln_removal(model)
    assert torch.equal(logits(removal.model, ids), logits(model, ids))
    assert [s.name for s in removal.switches] == [
        "transformer.h.0.ln_2", "transformer.h.1.ln_2", "transformer.h.0.ln_1:qk", "transformer.h.1.ln_1:qk",
        "transformer.h.0.ln_1:v", "transformer.h.1.ln_1:v", "transformer.ln_f",
    ]
    assert isinstance(removal.model.transformer.h[0].ln_1, SplitFakeLayerNorm)
    assert type(removal.model.transformer.h[0].ln_2) is FakeLayerNorm
    assert not any(isinstance(m, FakeLayerNorm) for m in model.modules())  # a deep copy by default
    # State-dict keys of the original are kept (plus σ̄ and the switch state).
    keys = set(removal.model.state_dict())
    assert set(model.state_dict()) <= keys


def test_prepare_post_ln_bert_switches_every_norm_whole_in_module_order() -> None:
    model = bert()
    ids = text_ids(2, 40) % 260
    removal = prepare_ln_removal(model)
    assert torch.equal(hidden(removal.model, ids), hidden(model, ids))
    assert removal.family is None and "no residual-stream map" in removal.notes[0]
    assert [s.name for s in removal.switches] == [
        "embeddings.LayerNorm", "encoder.layer.0.attention.output.LayerNorm", "encoder.layer.0.output.LayerNorm",
        "encoder.layer.1.attention.output.LayerNorm", "encoder.layer.1.output.LayerNorm",
    ]
    assert {s.group for s in removal.switches} == {"ln"}


def test_prepare_refuses_a_model_without_layer_norms() -> None:
    with pytest.raises(ValueError, match=r"prepare_ln_removal: Sequential has no LayerNorm over the last axis"):
        prepare_ln_removal(nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4)))
    with pytest.raises(TypeError, match=r"prepare_ln_removal: expected an nn.Module, got str"):
        prepare_ln_removal("gpt2")  # type: ignore[arg-type]


@pytest.mark.parametrize("qk_fixed", [True, False])
def test_value_path_split_on_gpt2_fused_c_attn(qk_fixed: bool) -> None:
    removal = prepare_ln_removal(gpt2())
    calibrate_sigma(removal, [text_ids(2, 64, gpt2=True)])
    block = removal.model.transformer.h[0]
    norm, c_attn = block.ln_1, block.attn.c_attn
    norm.fixed, norm.fixed_v = qk_fixed, not qk_fixed
    seen: dict[str, torch.Tensor] = {}
    handle = c_attn.register_forward_hook(lambda m, i, o: seen.update(out=o.detach()))
    x = torch.randn(2, 9, 48) * 2
    with torch.no_grad():
        block(x)
        handle.remove()
        fixed_norm = FakeLayerNorm.from_layer_norm(norm, float(norm.sigma), fixed=True)
        real_norm = FakeLayerNorm.from_layer_norm(norm)
        qk_in, v_in = (fixed_norm(x), real_norm(x)) if qk_fixed else (real_norm(x), fixed_norm(x))
        assert not torch.allclose(qk_in, v_in, atol=1e-3)
        d = 48
        torch.testing.assert_close(seen["out"][..., : 2 * d], c_attn(qk_in)[..., : 2 * d])
        torch.testing.assert_close(seen["out"][..., 2 * d :], c_attn(v_in)[..., 2 * d :])
    assert norm.v_input is None  # consumed by the value projection


def test_value_path_split_on_decoder_v_proj() -> None:
    removal = prepare_ln_removal(trained_decoder())
    block = removal.model.blocks[1]
    block.attn_in_norm.sigma.fill_(0.7)
    block.attn_in_norm.fixed_v = True
    x = torch.randn(2, 9, 48)
    seen: dict[str, torch.Tensor] = {}
    handles = [getattr(block.attn, name).register_forward_hook(lambda m, i, o, name=name: seen.update({name: o}))
               for name in ("q_proj", "v_proj")]
    with torch.no_grad():
        block(x)
        for h in handles:
            h.remove()
        real = FakeLayerNorm.from_layer_norm(block.attn_in_norm)
        fixed = FakeLayerNorm.from_layer_norm(block.attn_in_norm, 0.7, fixed=True)
        torch.testing.assert_close(seen["q_proj"], block.attn.q_proj(real(x)))
        torch.testing.assert_close(seen["v_proj"], block.attn.v_proj(fixed(x)))


# ------------------------------------------------------------------------------------------------- calibration


def test_calibrate_sigma_is_the_global_std_of_the_norm_input_without_position_0() -> None:
    model, ids = trained_decoder(), text_ids(3, 64)
    removal = prepare_ln_removal(model)
    captured: list[torch.Tensor] = []
    handle = model.blocks[1].mlp_in_norm.register_forward_pre_hook(lambda m, i: captured.append(i[0].detach()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    sigma = calibrate_sigma(removal, [ids[:2], ids[2:]])
    expected = captured[0][:, 1:].double().std().item()
    assert sigma["blocks.1.mlp_in_norm"] == pytest.approx(expected, rel=1e-9)
    assert float(removal.model.blocks[1].mlp_in_norm.sigma) == pytest.approx(expected, rel=1e-6)


def test_calibrate_sigma_leaves_padding_out() -> None:
    model = bert()
    ids = text_ids(2, 30) % 260
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    removal = prepare_ln_removal(model)
    captured: list[torch.Tensor] = []
    model.encoder.layer[0].output.LayerNorm.register_forward_pre_hook(lambda m, i: captured.append(i[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    keep = mask.bool().clone()
    keep[:, 0] = False
    expected = captured[0][keep].double().std().item()
    sigma = calibrate_sigma(removal, [{"input_ids": ids, "attention_mask": mask}])
    assert sigma["encoder.layer.0.output.LayerNorm"] == pytest.approx(expected, rel=1e-9)


def test_calibrate_sigma_refuses_no_batches() -> None:
    removal = prepare_ln_removal(trained_decoder())
    with pytest.raises(ValueError, match=r"calibrate_sigma: no batch reached blocks.0.mlp_in_norm"):
        calibrate_sigma(removal, [])


# ---------------------------------------------------------------------------------------------------- schedule


def test_staged_schedule_reproduces_the_paper_gpt2_small_steps() -> None:
    model = gpt2(n_layer=12, n_embd=16, n_head=2, perturb=False)
    removal = prepare_ln_removal(model)
    paper = {"mlp": (20, 2), "attn_qk": (44, 2), "attn_v": (68, 3), "final": (104, 0)}
    schedule = RemovalSchedule.staged(removal, paper)
    steps = schedule.steps
    assert steps["transformer.h.0.ln_2"] == 20 and steps["transformer.h.11.ln_2"] == 42
    assert steps["transformer.h.0.ln_1:qk"] == 44 and steps["transformer.h.11.ln_1:qk"] == 66
    assert steps["transformer.h.0.ln_1:v"] == 68 and steps["transformer.h.11.ln_1:v"] == 101
    assert steps["transformer.ln_f"] == 104 and schedule.last_step == 104
    assert schedule(19) == []
    assert schedule(21) == ["transformer.h.0.ln_2"]
    assert removal.model.transformer.h[0].ln_2.fixed and not removal.model.transformer.h[1].ln_2.fixed
    state = SimpleNamespace(global_step=104)
    control = object()
    assert schedule.on_step_begin(None, state, control) is control
    assert schedule.done and removal.pending == []


def test_even_schedule_and_refusals() -> None:
    removal = prepare_ln_removal(trained_decoder())
    schedule = RemovalSchedule.evenly(removal, 10, 40)
    assert list(schedule.steps.values()) == [10, 18, 25, 32, 40][: len(removal.switches)] or sorted(
        schedule.steps.values()) == list(schedule.steps.values())
    assert min(schedule.steps.values()) == 10 and schedule.last_step == 40
    with pytest.raises(ValueError, match=r"expected one step per switch; missing: \['blocks.0.mlp_in_norm'"):
        RemovalSchedule(removal, {})
    with pytest.raises(ValueError, match=r"expected 0 <= start <= stop, got start=5, stop=2"):
        RemovalSchedule.evenly(removal, 5, 2)
    with pytest.raises(KeyError, match=r"unknown switch 'nope'"):
        removal.fix("nope")


def test_std_aux_loss() -> None:
    removal = prepare_ln_removal(trained_decoder())
    aux = StdAuxLoss(removal, weight=0.1)
    ids = text_ids(2, 64)
    removal.model(ids)
    loss = aux()
    h_std: list[torch.Tensor] = []
    handle = removal.model.final_norm.register_forward_pre_hook(lambda m, i: h_std.append(i[0].detach()))
    removal.model(ids)
    handle.remove()
    std = (h_std[0][:, 1:].var(-1, unbiased=False) + 1e-5).sqrt()
    assert float(loss.detach()) == pytest.approx(0.1 * float(((std - std.mean()) ** 2).mean()), rel=1e-5)
    loss = aux()
    loss.backward()
    assert removal.model.embed.weight.grad is not None
    with pytest.raises(RuntimeError, match=r"StdAuxLoss: no forward reached final_norm"):
        aux()
    aux.remove()


# ------------------------------------------------------------------------------------------------------ export


def _fixed(model: nn.Module, ids: Any) -> Any:
    removal = prepare_ln_removal(model)
    calibrate_sigma(removal, [ids])
    removal.fix_all()
    return removal


@pytest.mark.parametrize("kind", ["gpt2", "decoder"])
def test_fold_export_leaves_no_norm_and_equals_the_fixed_model(kind: str) -> None:
    model, ids = (gpt2(), text_ids(4, 64, gpt2=True)) if kind == "gpt2" else (trained_decoder(), text_ids(4, 64))
    removal = _fixed(model, ids)
    ref = logits(removal.model, ids)
    report = export_removed_ln(removal)
    out = logits(report.model, ids)
    assert rel_err(out, ref) < FOLD_RTOL
    assert list(iter_norms(report.model)) == []
    assert not any(isinstance(m, CenteredAffine) for m in report.model.modules())
    assert not any(hook for m in report.model.modules() for hook in m._forward_hooks.values())
    assert rel_err(logits(model, ids), ref) > 1e-3  # the fixed-scale model itself differs from the original


def test_hf_export_of_gpt2_loads_into_the_original_class(tmp_path: Any) -> None:
    transformers = require("transformers", "hf")
    ids = text_ids(4, 64, gpt2=True)
    removal = _fixed(gpt2(), ids)
    report = export_removed_ln(removal, hf=True)
    assert report.model.config.layer_norm_epsilon == 1e12
    report.model.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.transformer.h[0].ln_1.eps == 1e12
    assert rel_err(logits(loaded, ids), logits(removal.model, ids)) < FOLD_RTOL


def test_post_ln_bert_exports(tmp_path: Any) -> None:
    transformers = require("transformers", "hf")
    model, ids = bert(), text_ids(2, 40) % 260
    removal = _fixed(model, ids)
    ref = hidden(removal.model, ids)
    folded = export_removed_ln(removal).model
    assert rel_err(hidden(folded, ids), ref) < FOLD_RTOL
    assert list(iter_norms(folded)) == []
    assert sum(isinstance(m, CenteredAffine) for m in folded.modules()) == 5
    hf = export_removed_ln(removal, hf=True).model
    hf.save_pretrained(tmp_path)
    loaded = transformers.BertModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    assert loaded.config.layer_norm_eps == 1e12
    assert rel_err(hidden(loaded, ids), ref) < FOLD_RTOL


def test_export_refusals() -> None:
    removal = prepare_ln_removal(trained_decoder())
    with pytest.raises(ValueError, match=r"every FakeLayerNorm must be in fixed-scale mode .* still real: "
                                         r"blocks.0.attn_in_norm:qk, blocks.0.attn_in_norm:v, "
                                         r"blocks.0.mlp_in_norm, .*\(7 in all\)"):
        export_removed_ln(removal)
    removal.fix_all()
    half = copy.deepcopy(removal.model).half()
    with pytest.raises(ValueError, match=r"hf=True needs float32 \(or float64\) norms, got torch.float16"):
        export_removed_ln(half, hf=True)
    with pytest.raises(ValueError, match=r"expected a model with FakeLayerNorm modules"):
        export_removed_ln(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"expected an nn.Module or an LNRemoval, got int"):
        export_removed_ln(3)  # type: ignore[arg-type]


def test_removal_by_finetuning_switches_everything_and_learns() -> None:
    model = trained_decoder()
    ids = text_ids(8, 64, offset=100_000)

    def batches() -> Any:
        i = 0
        while True:
            yield text_ids(8, 64, offset=150_000 + (i % 10) * 512)
            i += 1

    run = remove_ln_by_finetuning(model, batches(), lambda m, b: m(b, labels=b).loss, steps=24,
                                  calibration=[ids], lr=3e-3, aux_weight=0.01)
    assert run.removal.pending == []
    assert sorted(run.switched_at.values()) == sorted(run.schedule.steps.values())
    assert all(torch.isfinite(torch.tensor(run.losses)))
    folded = export_removed_ln(run.removal).model
    val = text_ids(4, 64, offset=210_000)
    with torch.no_grad():
        loss_fixed = run.removal.model(val, labels=val).loss
        assert float(folded(val, labels=val).loss) == pytest.approx(float(loss_fixed), rel=1e-5)
