"""fold_norms on plain modules (torch.fx discovery, explicit maps), its refusals, and the no-mutation-on-error rule.

Model-level proofs on normlab's Transformers trained on real text live in ``test_fold_models.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from normlab.nn import BatchNorm, LayerNorm
from normlab.registry import create_norm
from normlab.surgery import FoldReport, fold_norms

D = torch.float64
FOLDABLE = ["batch_norm", "rep_batch_norm", "unified_norm", "power_norm", "identity"]


class PreNormAttention(nn.Module):
    """``h = gelu(n0(inp(x)))``; ``h + out(attn(q(n1 h), k(n1 h), v(n1 h)))``: n0 folds into ``inp`` (producer),
    n1 into q, k, v (consumers)."""

    def __init__(self, norm: str, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.n0 = create_norm(norm, d, channel_dim=-1)
        self.n1 = create_norm(norm, d, channel_dim=-1)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d, bias=(i != 1)) for i in range(4))

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.n0(self.inp(x)))
        n = self.n1(h)
        att = torch.softmax(self.q(n) @ self.k(n).transpose(-1, -2) / math.sqrt(n.shape[-1]), dim=-1)
        return h + self.out(att @ self.v(n))


def _randomise(model: nn.Module, seed: int, var_scale: float, mean_scale: float) -> None:
    """Random running statistics and affine parameters for every norm (what training would leave behind)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if not buf.is_floating_point():
                continue
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g, dtype=D) * mean_scale)
            elif name.rsplit(".", 1)[-1].startswith("running_"):
                buf.copy_(torch.rand(buf.shape, generator=g, dtype=D) * var_scale + 1e-3 * var_scale)
        for name, p in model.named_parameters():
            if name.split(".")[0].startswith("n"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=D))


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


@settings(max_examples=25, deadline=None)
@given(
    norm=st.sampled_from(FOLDABLE),
    seed=st.integers(0, 2**31 - 1),
    var_scale=st.floats(1e-2, 1e2),
    mean_scale=st.floats(0.0, 10.0),
)
def test_property_fold_leaves_eval_outputs_unchanged(norm: str, seed: int, var_scale: float, mean_scale: float) -> None:
    model = PreNormAttention(norm).double().eval()
    _randomise(model, seed, var_scale, mean_scale)
    x = torch.randn(3, 5, 8, dtype=D, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(x)
        report = fold_norms(model, strict=False)
        out = report.model(x)
    assert _rel(out, ref) < 1e-10
    folded = {r.norm: r for r in report.folded}
    assert folded["n1"].targets == ("q", "k", "v") and folded["n1"].direction == "into_consumers"
    if norm == "power_norm":  # GroupScaling stays between inp and the affine: n0 cannot fold into inp
        assert [r.norm for r in report.refused] == ["n0"] and type(report.model.n1).__name__ == "KeptAfterFold"
    else:
        assert folded["n0"].targets == ("inp",) and folded["n0"].direction == "into_producer"
        assert not any(isinstance(m, type(model.n1)) for m in report.model.modules())
    assert model.k.bias is None and report.model.k.bias is not None  # the copy got a bias; the original is intact


def test_torch_batchnorm_sequential_and_docstring_example() -> None:
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    _randomise_torch_bn(net)
    x = torch.randn(16, 6)
    report = fold_norms(net)
    assert isinstance(report, FoldReport) and not report.inplace and report.model is not net
    assert [(r.norm, r.targets, r.replaced_by, r.found_by) for r in report.folded] == [("1", ("0",), "Identity", "fx")]
    assert _rel(report.model(x), net(x)) < 1e-5
    assert "folded 1 norm(s), refused 0" in str(report)


def _randomise_torch_bn(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)


def test_convnet_folds_conv_bn_and_bn_reflect_conv_but_refuses_zero_padded_conv() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        BatchNorm(8),  # -> reflect-padded conv: exact
        nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # -> zero-padded conv: refused
        nn.Conv2d(4, 4, 3, padding=1),
    ).eval()
    _randomise_torch_bn(net)
    with torch.no_grad():
        net[3].running_mean.normal_()
        net[3].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 9, 9)
    with pytest.raises(ValueError, match=r"6 \(BatchNorm2d\): 7 is a conv with zero padding"):
        fold_norms(net)
    report = fold_norms(net, strict=False)
    assert [(r.norm, r.direction) for r in report.folded] == [("1", "into_producer"), ("3", "into_consumers")]
    assert [r.norm for r in report.refused] == ["6"]
    assert _rel(report.model(x), net(x)) < 1e-5


class Residual(nn.Module):
    """Post-norm style: the norm's output is both the stream and the linear's input."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = BatchNorm(8, channel_dim=-1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return h + self.fc(h)


def test_refuses_a_norm_whose_output_feeds_the_residual_stream() -> None:
    with pytest.raises(ValueError, match=r"norm \(BatchNorm\).*feeds call_function .*add.*residual stream"):
        fold_norms(Residual().eval())
    report = fold_norms(Residual().eval(), strict=False)
    assert report.folded == [] and report.refused[0].norm == "norm"


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = BatchNorm(8, channel_dim=-1)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.a(self.norm(x)) + self.b(x)


class TwiceCalled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = BatchNorm(8, channel_dim=-1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x)) + self.fc(x) + self.norm(2 * x).sum()


def test_refuses_tied_weights_and_layers_or_norms_called_twice() -> None:
    with pytest.raises(ValueError, match=r"weight of a is shared/tied with b\.weight"):
        fold_norms(Tied().eval())
    with pytest.raises(ValueError, match="called 2 times in the traced forward"):
        fold_norms(TwiceCalled().eval())


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = BatchNorm(8, channel_dim=-1)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return self.a(h) if x.sum() > 0 else self.b(h)


def test_untraceable_model_needs_an_explicit_map_which_then_folds() -> None:
    model = Untraceable().eval()
    _randomise(model, 0, 1.0, 1.0)
    with pytest.raises(TypeError, match=r"could not trace Untraceable with torch.fx.*pass consumers="):
        fold_norms(model)
    report = fold_norms(model, consumers={"norm": ["a", "b"]})
    assert report.folded[0].found_by == "map" and report.folded[0].targets == ("a", "b")
    for sign in (1.0, -1.0):
        x = sign * (torch.rand(4, 8) + 0.1)
        assert _rel(report.model(x), model(x)) < 1e-5


def test_explicit_map_input_errors() -> None:
    model = Untraceable().eval()
    with pytest.raises(ValueError, match="'nope', which is not a submodule path"):
        fold_norms(model, consumers={"norm": ["nope"]})
    with pytest.raises(ValueError, match="consumers key 'a' is a Linear, not a norm; norms in the model: \\['norm'\\]"):
        fold_norms(model, consumers={"a": ["b"]})
    with pytest.raises(TypeError, match="expected consumers entries"):
        fold_norms(model, consumers={"norm": []})
    with pytest.raises(TypeError, match="expected consumers to be a dict"):
        fold_norms(model, consumers=[("norm", "a")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a has in_features=8, the norm has 4 channels"):
        bad = Untraceable().eval()
        bad.norm = BatchNorm(4, channel_dim=-1).eval()
        fold_norms(bad, consumers={"norm": "a"})


def test_refuses_train_mode_and_non_foldable_norms_without_mutating() -> None:
    model = PreNormAttention("batch_norm")
    with pytest.raises(RuntimeError, match="needs eval mode.*call model.eval"):
        fold_norms(model)
    model.eval()
    model.n0.train()
    with pytest.raises(RuntimeError, match="norms in train mode: n0"):
        fold_norms(model)
    model = PreNormAttention("batch_norm").eval()
    model.n1 = LayerNorm(8).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    msg = r"(?s)refused to fold 1 norm\(s\); the model was not changed.*layer_norm is not "
    with pytest.raises(TypeError, match=msg):
        fold_norms(model, inplace=True)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.n0, BatchNorm) and model.q.bias is not None and model.k.bias is None


def test_inplace_folds_the_model_itself() -> None:
    model = PreNormAttention("batch_norm").eval()
    _randomise(model.double(), 1, 1.0, 1.0)
    x = torch.randn(2, 3, 8, dtype=D)
    ref = model(x)
    report = fold_norms(model, inplace=True)
    assert report.model is model and report.inplace and isinstance(model.n1, nn.Identity)
    assert _rel(model(x), ref) < 1e-12


def test_torch_batchnorm_without_running_stats_and_linear_with_parametrization_are_refused() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(TypeError, match="track_running_stats=False"):
        fold_norms(net)
    net = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), BatchNorm(4, channel_dim=-1)).eval()
    with pytest.raises(ValueError, match="0 has a parametrization"):
        fold_norms(net)


def test_two_norms_mapped_to_one_linear_are_refused() -> None:
    model = PreNormAttention("batch_norm").eval()
    report = fold_norms(model, consumers={"n0": ["q"], "n1": ["q", "k", "v"]}, strict=False)
    assert [r.norm for r in report.folded] == ["n0"]
    assert "already folded with n0" in report.refused[0].reason
