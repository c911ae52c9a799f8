"""The last step of LayerNorm removal by fine-tuning (Baroni et al. 2025, "Transformers Don't Need LayerNorm at
Inference Time", https://arxiv.org/abs/2507.02559): :func:`export_removed_ln` turns a model whose every
:class:`~normlab.nn.FakeLayerNorm` is in fixed-scale mode into one without them.

Two forms, both computing what the fixed-scale model computes:

* ``hf=False``: fold. A fixed-scale norm is ``(γ/σ̄) ⊙ (x − mean x) + β``, an affine map of ``x``. In a Pre-LN model
  (with a residual-stream map: GPT-2, ``DecoderLM``) its readers take it: ``W ← W·diag(γ/σ̄)``, ``b ← b + W β``, then
  ``W`` is centred over its input axis, which absorbs the ``− mean x``; the norm becomes ``nn.Identity``. This is the
  authors' true removal (their ``γ/1e6`` undo followed by TransformerLens's ``fold_ln`` and ``LNPre → Identity``). The
  final norm folds into the head, which gets a bias for β and is untied from the token embedding. In a Post-LN model
  (BERT) a norm's output *is* the residual stream, read by the skip connection as well as by linear layers, so there is
  no reader to fold into without reparameterizing the whole stream; each norm becomes a :class:`CenteredAffine`, the
  same linear map with no statistic left to compute (and a final norm without a head likewise).
* ``hf=True``: the authors' Hugging Face-loadable form (their ``remove_layernorm_by_scaling``). Every norm stays a
  LayerNorm of the model's own class with ``γ ← γ·10⁶/σ̄`` and ``eps = 10¹²`` (in the modules and in the config's eps
  field), so ``LN(x) = (x − μ)/sqrt(var + 10¹²)·γ·10⁶/σ̄ + β``, the fixed-scale norm up to a relative ``var/2·10¹²``. The
  weights are then of order 10⁶: float32 or float64 only (float16 overflows at 65504).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from normlab.nn.fixed_scale_layer_norm import FakeLayerNorm
from normlab.nn.layer_norm import LayerNorm
from normlab.surgery._residual import (
    Stream,
    StreamSurgeryReport,
    read_linear,
    resolve_stream,
    set_module,
    untie_head,
    write_linear,
)
from normlab.surgery.ln_removal import LNRemoval, _ValuePathHook
from normlab.surgery.stream_math import fold_ln_into_reader

__all__ = ["HF_EPS", "HF_SCALE", "CenteredAffine", "export_removed_ln"]

HF_SCALE = 1e6
HF_EPS = 1e12
# Config fields that hold the LayerNorm eps in Hugging Face configs (GPT-2, BERT and its relatives, ViT, ...).
_CONFIG_EPS = ("layer_norm_epsilon", "layer_norm_eps", "norm_eps")


class CenteredAffine(nn.Module):
    """``y = weight ⊙ (x − mean(x)) + bias`` over the last axis: a fixed-scale LayerNorm folded to a linear map.

    Args:
        weight: ``(C,)``, the fixed-scale norm's ``γ/σ̄``.
        bias: ``(C,)`` or ``None``, its β.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        y = (x - x.mean(-1, keepdim=True)) * self.weight
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, bias={self.bias is not None}"


def _fake_norms(model: nn.Module) -> list[tuple[str, FakeLayerNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeLayerNorm)]


def _check_fixed(norms: list[tuple[str, FakeLayerNorm]], op: str) -> None:
    if not norms:
        raise ValueError(f"{op}: expected a model with FakeLayerNorm modules (prepare_ln_removal), found none")
    real: list[str] = []
    for n, m in norms:  # named as the removal's switches: a split norm's paths as "<name>:qk" and "<name>:v"
        split = hasattr(m, "fixed_v")
        if not m.fixed:
            real.append(n + ":qk" if split else n)
        if split and not getattr(m, "fixed_v"):  # noqa: B009
            real.append(n + ":v")
    if real:
        shown = ", ".join(real[:4]) + (f", ... ({len(real)} in all)" if len(real) > 4 else "")
        raise ValueError(
            f"{op}: every FakeLayerNorm must be in fixed-scale mode before the export (finish the removal schedule "
            f"or call removal.fix_all()); still real: {shown}"
        )


def _check_precision(norms: list[tuple[str, FakeLayerNorm]], op: str) -> None:
    for name, m in norms:
        for t in (m.weight, m.bias, m.sigma):
            if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16):
                raise ValueError(
                    f"{op}: hf=True needs float32 (or float64) norms, got {t.dtype} at {name}: the exported weights "
                    f"γ·{HF_SCALE:.0e}/σ̄ overflow float16 (max 65504) and lose the fixed scale in bfloat16; export "
                    "in float32 (model.float())"
                )


def _drop_value_hooks(model: nn.Module) -> None:
    for m in model.modules():
        for key, hook in list(m._forward_hooks.items()):
            if isinstance(hook, _ValuePathHook):
                del m._forward_hooks[key]


def _affine(m: FakeLayerNorm) -> tuple[Tensor, Tensor | None]:
    """Float64 ``(γ/σ̄, β)`` of a fixed-scale norm."""
    gamma = m.weight.detach().double() if isinstance(m.weight, Tensor) else torch.ones(m.num_features)
    beta = m.bias.detach().double() if isinstance(m.bias, Tensor) else None
    return gamma.double() / float(m.sigma), beta


def _fold_into_readers(
    model: nn.Module, path: str, readers: tuple[str, ...], report: StreamSurgeryReport
) -> None:
    norm = model.get_submodule(path)
    assert isinstance(norm, FakeLayerNorm)
    scale, beta = _affine(norm)
    for reader in readers:
        w, b = read_linear(model, reader, report.op)
        w2, b2 = fold_ln_into_reader(w.double(), b.double() if b is not None else None, scale, beta, center=True)
        write_linear(model, reader, w2.to(w.dtype), b2.to(w.dtype) if b2 is not None else None)
    set_module(model, path, nn.Identity())
    report.add(path, "folded", f"γ/σ̄{', β' if beta is not None else ''} into {', '.join(readers)}; readers centred; "
               "the norm is now nn.Identity")


def _to_centered_affine(model: nn.Module, path: str, report: StreamSurgeryReport, why: str) -> None:
    norm = model.get_submodule(path)
    assert isinstance(norm, FakeLayerNorm)
    scale, beta = _affine(norm)
    like = norm.sigma
    new = CenteredAffine(scale.to(like.dtype), beta.to(like.dtype) if beta is not None else None).to(like.device)
    set_module(model, path, new)
    report.add(path, "replaced", f"fixed-scale LayerNorm -> CenteredAffine ({why})")


def _fold_stream(model: nn.Module, stream: Stream, report: StreamSurgeryReport) -> None:
    for block in stream.blocks:
        for path, readers in block.norms():
            _fold_into_readers(model, path, readers, report)
    if stream.final_norm is None:
        return
    if stream.head is None:
        _to_centered_affine(model, stream.final_norm, report, "no head reads it: its output is the model's output")
        return
    untie_head(model, stream, report, "the final norm is folded into the head only")
    _fold_into_readers(model, stream.final_norm, (stream.head,), report)


def _to_hf_form(model: nn.Module, norms: list[tuple[str, FakeLayerNorm]], report: StreamSurgeryReport) -> None:
    hf_model = type(model).__module__.startswith("transformers.")
    for path, m in norms:
        scale, beta = _affine(m)
        dt, dev = m.sigma.dtype, m.sigma.device
        new: nn.Module
        if hf_model:
            new = nn.LayerNorm(m.num_features, eps=HF_EPS, bias=beta is not None, device=dev, dtype=dt)
        else:
            new = LayerNorm(m.num_features, eps=HF_EPS, bias=beta is not None, device=dev, dtype=dt)
        weight, bias = new.weight, new.bias
        assert isinstance(weight, Tensor)
        with torch.no_grad():
            weight.copy_((scale * HF_SCALE).to(dt))
            if beta is not None and isinstance(bias, Tensor):
                bias.copy_(beta.to(dt))
        set_module(model, path, new)
        report.add(path, "replaced", f"fixed-scale LayerNorm -> {type(new).__name__}(eps={HF_EPS:.0e}), "
                   f"γ·{HF_SCALE:.0e}/σ̄ with σ̄={float(m.sigma):.6g}")
    cfg = getattr(model, "config", None)
    for key in _CONFIG_EPS:
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, HF_EPS)
            report.notes.append(f"config.{key} = {HF_EPS:.0e}")


def export_removed_ln(model: nn.Module | LNRemoval, *, hf: bool = False, inplace: bool = False) -> StreamSurgeryReport:
    """Remove the fixed-scale LayerNorms of a model whose removal is finished (see the module docstring for the forms).

    Args:
        model: a model (or the :class:`~normlab.surgery.LNRemoval`) whose every
            :class:`~normlab.nn.FakeLayerNorm` is in fixed-scale mode (value paths included).
        hf: the Hugging Face-loadable form (large γ, eps 10¹²) instead of the fold.
        inplace: rewrite the model itself; default: a deep copy, returned as ``report.model``.

    Returns:
        A :class:`~normlab.surgery.StreamSurgeryReport` (``op="export_removed_ln"``) whose model computes what the
        fixed-scale model computes: to float rounding for the fold; to a relative ``var/2·10¹²`` for ``hf=True``.

    Raises:
        TypeError: not a model. ValueError: no FakeLayerNorm, one still in real mode, float16/bfloat16 norms with
            ``hf=True``.

    Example:
        >>> from normlab.models import DecoderLM, TransformerConfig
        >>> from normlab.surgery import prepare_ln_removal
        >>> removal = prepare_ln_removal(DecoderLM(TransformerConfig(d_model=16, n_layers=1, n_heads=2,
        ...                                                          vocab_size=32)))
        >>> removal.fix_all()
        >>> type(export_removed_ln(removal).model.final_norm).__name__
        'Identity'
    """
    op = "export_removed_ln"
    source = model.model if isinstance(model, LNRemoval) else model
    if not isinstance(source, nn.Module):
        raise TypeError(f"{op}: expected an nn.Module or an LNRemoval, got {type(model).__name__}")
    norms = _fake_norms(source)
    _check_fixed(norms, op)
    if hf:
        _check_precision(norms, op)
    target = source if inplace else copy.deepcopy(source)
    norms = _fake_norms(target)
    _drop_value_hooks(target)
    stream: Stream | None
    why = "other norms in its stream"
    try:
        stream = resolve_stream(target, op)
    except (TypeError, ValueError) as exc:
        stream, why = None, str(exc)
    report = StreamSurgeryReport(model=target, op=op, family=stream.smap.family if stream else "generic",
                                 inplace=inplace)
    if hf:
        _to_hf_form(target, norms, report)
        return report
    if stream is not None and all(isinstance(target.get_submodule(p), FakeLayerNorm) for p in stream.norms()):
        _fold_stream(target, stream, report)
    else:
        report.notes.append(
            f"no Pre-LN residual-stream map ({why}): the norms act on the stream itself, so each becomes a "
            "CenteredAffine instead of folding into readers"
        )
    for path, _ in _fake_norms(target):
        _to_centered_affine(target, path, report, "its output is the residual stream (Post-LN) or not mapped")
    return report
