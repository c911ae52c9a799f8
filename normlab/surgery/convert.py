"""Exact conversion of a Pre-LN Transformer to Pre-RMSNorm and Pre-CRMSNorm: :func:`convert_to_rms_norm`,
:func:`convert_to_crms_norm`.

Jiang, Gu, Zhu, Pan, "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN Transformers",
NeurIPS 2023 (https://arxiv.org/abs/2305.14858), §3: in a Pre-LN Transformer every reader of the residual stream sits
behind a LayerNorm, which removes the mean, so centring every writer (embeddings, attention out-projection, FFN
down-projection, their biases) changes no output and makes the stream zero-mean; there LayerNorm equals RMSNorm with
the same eps inside the root. A zero-mean d-vector is also losslessly stored in d−1 coordinates, read by CRMSNorm.
Where the writers and readers are comes from the model's residual-stream map (:mod:`normlab.surgery._residual`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normlab.nn.rms_norm import CRMSNorm, RMSNorm
from normlab.surgery._residual import (
    Stream,
    StreamSurgeryReport,
    head_is_tied,
    read_linear,
    read_table,
    set_module,
    write_linear,
    write_table,
)
from normlab.surgery.ln_fold import center_stream_writers, fold_stream_norms, prepare, read_layer_norm
from normlab.surgery.stream_math import compress_reader, compress_writer

__all__ = ["PadLastAxis", "ZeroMean", "convert_to_crms_norm", "convert_to_rms_norm"]


class ZeroMean(nn.Module):
    """Parametrization ``t − mean_dim(t)``: a stream writer whose output stays zero-mean while it trains (the
    paper's ``pre_rms_training``: centred weight and bias computed in the forward, gradients through the centring).

    Args:
        dim: the d_model axis of the parameter (``0`` for an ``nn.Linear`` weight or a bias, ``-1`` for an
            embedding table or a Hugging Face ``Conv1D`` weight).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        return t - t.mean(dim=self.dim, keepdim=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class PadLastAxis(nn.Module):
    """``F.pad(norm(x), (0, 1))``: a CRMSNorm output of width d−1 padded with a zero to width d, for an attention that
    reshapes its context to its input's width (normlab's ``Attention``); its readers get a zero last column."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return F.pad(self.norm(x), (0, 1))


def _check_precision(model: nn.Module, op: str) -> None:
    low = [(n, p.dtype) for n, p in model.named_parameters() if p.is_floating_point() and p.dtype.itemsize < 4]
    if low:
        names = ", ".join(n for n, _ in low[:3]) + (", ..." if len(low) > 3 else "")
        raise ValueError(
            f"{op}: expected float32 or float64 parameters, got {low[0][1]} ({names}): in low precision the "
            "stream mean is 0 only up to rounding and RMSNorm no longer equals LayerNorm; convert in float32 "
            "(model.float()) and cast the result afterwards"
        )


def _check_no_stream_dropout(model: nn.Module, stream: Stream, op: str) -> None:
    active = []
    for path in stream.dropout:
        module = model.get_submodule(path)
        if isinstance(module, nn.Dropout) and module.p > 0:
            active.append(f"{path} (p={module.p})")
    if active:
        raise ValueError(
            f"{op}: zero_mean_training needs no dropout on the residual stream (dropout of a zero-mean write is not "
            f"zero-mean, so RMSNorm would no longer equal LayerNorm in training); got {', '.join(active[:4])}"
        )


def _rms_norm_for(model: nn.Module, path: str, stream: Stream, op: str) -> nn.Module:
    ln = read_layer_norm(model, path, stream.d_model, op)
    like = read_table(model, stream.token_embedding)
    rms = RMSNorm(
        stream.d_model,
        eps=ln.eps,
        eps_placement="inside",
        affine=ln.weight is not None,
        bias=ln.bias is not None,
        device=like.device,
        dtype=like.dtype,
    )
    with torch.no_grad():
        for name in ("weight", "bias"):
            src = getattr(ln, name)
            if src is not None:
                getattr(rms, name).copy_(src)
    return rms


def _final_affine_is_identity(model: nn.Module, stream: Stream, op: str) -> bool:
    if stream.final_norm is None:
        return True
    ln = read_layer_norm(model, stream.final_norm, stream.d_model, op)
    gamma_one = ln.weight is None or bool(ln.weight.detach().eq(1).all())
    return gamma_one and (ln.bias is None or bool(ln.bias.detach().eq(0).all()))


def _parametrize_writers(model: nn.Module, stream: Stream, report: StreamSurgeryReport) -> None:
    for path in stream.embeddings:
        parent, _, name = path.rpartition(".")
        owner: Any = model.get_submodule(parent) if parent else model
        if isinstance(getattr(owner, name), nn.Embedding):
            owner, name = getattr(owner, name), "weight"
        parametrize.register_parametrization(owner, name, ZeroMean(-1))
        report.add(path, "parametrized", "rows centred over d_model in every forward")
    for path in stream.writers():
        layer: Any = model.get_submodule(path)
        conv1d = type(layer).__name__ == "Conv1D"
        parametrize.register_parametrization(layer, "weight", ZeroMean(-1 if conv1d else 0))
        if layer.bias is not None:
            parametrize.register_parametrization(layer, "bias", ZeroMean(0))
        report.add(path, "parametrized", "weight and bias centred over d_model in every forward")


def convert_to_rms_norm(
    model: nn.Module, *, zero_mean_training: bool = False, inplace: bool = False
) -> StreamSurgeryReport:
    """Convert a Pre-LN Transformer to the arithmetically equivalent Pre-RMSNorm form (Jiang et al. 2023, §3.2).

    Every stream writer is centred over d_model (token and position embeddings, attention out-projection, FFN
    down-projection, their biases), and every LayerNorm (block and final) becomes a normlab
    :class:`~normlab.nn.RMSNorm` with the same eps inside the root and the same γ, β (state-dict keys ``weight`` /
    ``bias`` kept). A head tied to the token embedding stays tied when the final norm's affine is the identity (the
    head then reads a zero-mean vector, on which the centred table acts as the original); otherwise it is untied and
    keeps the original unembedding.

    With ``zero_mean_training`` the writers are not rewritten but parametrized (:class:`ZeroMean`, via
    ``torch.nn.utils.parametrize``) so that they stay centred while training: the converted model then has the same
    loss as the original at every parameter value, hence the same gradients and the same optimizer trajectory (the
    paper's equivalence in training). A tied head stays tied and reads the raw table. Needs no dropout on the stream.
    ``torch.nn.utils.parametrize.remove_parametrizations(m, name)`` bakes the centring in afterwards.

    The eval-mode outputs are unchanged up to float rounding. Config fields (``TransformerConfig.norm``, a Hugging Face
    config) still describe the original model; the converted module is the result.

    Args:
        model: a Pre-LN Transformer with a residual-stream map (Hugging Face GPT-2, normlab ``DecoderLM`` with
            ``placement="pre"``), float32 or float64.
        zero_mean_training: parametrize the writers for training, see above.
        inplace: rewrite ``model`` itself; default: a deep copy, returned as ``report.model``.

    Returns:
        A :class:`~normlab.surgery._residual.StreamSurgeryReport`.

    Raises:
        TypeError: a model type without a residual-stream map, a norm that is not a LayerNorm. ValueError: a Post-LN
            model, float16/bfloat16 parameters, stream dropout with ``zero_mean_training``.

    Example:
        >>> from normlab.models import DecoderLM, TransformerConfig
        >>> lm = DecoderLM(TransformerConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=32)).eval()
        >>> type(convert_to_rms_norm(lm).model.final_norm).__name__
        'RMSNorm'
    """
    op = "convert_to_rms_norm"
    _check_precision(model, op)
    target, stream, report = prepare(model, op, inplace)
    if zero_mean_training:
        _check_no_stream_dropout(target, stream, op)
        _parametrize_writers(target, stream, report)
    else:
        tied = head_is_tied(target, stream)
        keep_tie = tied and _final_affine_is_identity(target, stream, op)
        if tied and keep_tie:
            report.notes.append("the head stays tied to the centred token embedding: it reads a zero-mean vector")
        center_stream_writers(target, stream, report, untie=not keep_tie)
    for path in stream.norms():
        set_module(target, path, _rms_norm_for(target, path, stream, op))
        report.add(path, "replaced", "LayerNorm -> RMSNorm (same eps, inside the root; same γ, β)")
    report.notes.append("the model's config still describes LayerNorms; the returned module is the converted model")
    return report


def _compress_stream(model: nn.Module, stream: Stream, report: StreamSurgeryReport) -> None:
    pad = stream.smap.attn_width_from_input
    for path in stream.embeddings:
        write_table(model, path, compress_writer(read_table(model, path), dim=-1)[0])
        report.add(path, "compressed", "keeps the first d-1 stream coordinates")
    for path in stream.writers():
        w, b = read_linear(model, path, report.op)
        write_linear(model, path, *compress_writer(w, b, dim=0))
        report.add(path, "compressed", "keeps its first d-1 output rows")
    readers = [(r, pad and r in b.attn_readers) for b in stream.blocks for _, rs in b.norms() for r in rs]
    readers += [(stream.head, False)] if stream.head is not None else []
    for path, padded in readers:
        w, b = read_linear(model, path, report.op)
        w2 = compress_reader(w)
        if padded:  # the padded zero input coordinate: any column works, zero keeps it inert
            w2 = torch.cat([w2, torch.zeros_like(w2[:, :1])], dim=1)
        write_linear(model, path, w2, b)
        report.add(path, "compressed", "reads d-1 coordinates: W[:, :d-1] - W[:, d-1:]" + (" (+ zero pad)" * padded))


def convert_to_crms_norm(model: nn.Module, *, inplace: bool = False) -> StreamSurgeryReport:
    """Convert a Pre-LN Transformer to Pre-CRMSNorm with a (d−1)-wide residual stream (Jiang et al. 2023, §3.3).

    First every LayerNorm's γ, β are folded into its readers (the final norm's into the head, which gets a bias if it
    had none; a tied head is untied) and every writer is centred, as :func:`~normlab.surgery.fold_ln` does; then every
    writer keeps its first d−1 stream coordinates, every reader (q/k/v, FFN-in, head) reads ``W[:, :d−1] − W[:, d−1:]``
    and every norm becomes a parameter-free :class:`~normlab.nn.CRMSNorm` of width d−1 with the LayerNorm's eps.
    Where the attention reshapes its context to its input's width (normlab's ``DecoderLM``), the attention-input
    CRMSNorm is wrapped in :class:`PadLastAxis` and q/k/v keep a zero d-th column (reported in ``report.notes``).

    The eval-mode outputs are unchanged up to float rounding. The model's config still says d.

    Args:
        model: as :func:`convert_to_rms_norm`, with a head.
        inplace: rewrite ``model`` itself; default: a deep copy.

    Raises:
        As :func:`convert_to_rms_norm`; ValueError for a model without a head (its output is the d-wide stream).

    Example:
        >>> from normlab.models import DecoderLM, TransformerConfig
        >>> lm = DecoderLM(TransformerConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=32)).eval()
        >>> convert_to_crms_norm(lm).model.embed.weight.shape
        torch.Size([32, 15])
    """
    op = "convert_to_crms_norm"
    _check_precision(model, op)
    target, stream, report = prepare(model, op, inplace)
    if stream.head is None:
        raise ValueError(f"{op}: {type(model).__name__} has no head; its output is the d-wide stream itself")
    fold_stream_norms(target, stream, report, "head_bias", keep_ln_params=False)
    center_stream_writers(target, stream, report)
    _compress_stream(target, stream, report)
    d = stream.d_model
    attn_norms = {b.attn_norm for b in stream.blocks}
    like = read_table(target, stream.token_embedding)
    for path in stream.norms():
        eps = float(getattr(target.get_submodule(path), "eps"))  # noqa: B009
        crms = CRMSNorm(d - 1, eps=eps, affine=False, device=like.device, dtype=like.dtype)
        padded = stream.smap.attn_width_from_input and path in attn_norms
        set_module(target, path, PadLastAxis(crms) if padded else crms)
        report.add(path, "replaced", f"parameter-free LayerNorm -> CRMSNorm({d - 1})" + (", padded" * padded))
    if stream.smap.attn_width_from_input:
        report.notes.append(
            "the attention reshapes its context to its input width, so its input is padded back to d with a zero "
            "and q/k/v keep a zero last column (no saving there until it reshapes to n_heads * d_head)"
        )
    report.notes.append(f"the stream is {d - 1} wide; the model's config still says {d}")
    return report
