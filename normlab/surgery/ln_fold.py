"""LayerNorm affine folding of Pre-LN Transformers with TransformerLens semantics: :func:`fold_ln`,
:func:`center_writing_weights`, :func:`center_unembed`, :func:`fold_value_biases`.

TransformerLens (Nanda & Bloom, https://github.com/TransformerLensOrg/TransformerLens, ``process_weights``) applies,
in this order: fold each LayerNorm's γ, β into the layers reading it and centre those readers over d_model (the
LayerNorm becomes parameter-free, ``LNPre``); centre every writer into the residual stream; centre the unembedding
over the vocabulary; fold the value biases into the attention out-projection bias. Each is exact in eval mode (the
tensor math and why it is exact: :mod:`normlab.surgery.stream_math`). Where the model's modules are comes from its
residual-stream map (:mod:`normlab.surgery._residual`): Hugging Face GPT-2 and normlab's Pre-LN
:class:`~normlab.models.DecoderLM`; Post-LN models are refused.

The parameter-free LayerNorms keep the model's own class: ``torch.nn.LayerNorm(elementwise_affine=False)`` in a
Hugging Face model, normlab ``LayerNorm(affine=False)`` in a normlab one, so the module tree and forward are the
original ones. That drops the norms' ``weight``/``bias`` state-dict keys; ``keep_ln_params=True`` instead keeps them
as γ = 1, β = 0, so a Hugging Face ``save_pretrained`` directory loads into the original class with no missing keys.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, cast

from torch import Tensor, nn

from normlab.nn.layer_norm import LayerNorm
from normlab.surgery._residual import (
    Stream,
    StreamSurgeryReport,
    read_linear,
    read_table,
    resolve_stream,
    set_module,
    untie_head,
    write_linear,
    write_table,
)
from normlab.surgery.stream_math import (
    center_unembed_weights,
    center_writer,
    fold_ln_into_reader,
    fold_value_bias,
)

__all__ = ["center_unembed", "center_writing_weights", "fold_ln", "fold_value_biases"]

FinalBias = Literal["auto", "head_bias", "keep"]


@dataclass(frozen=True)
class LNParams:
    """A LayerNorm's affine and eps, read from a torch or normlab LayerNorm over the last axis."""

    weight: Tensor | None
    bias: Tensor | None
    eps: float
    normlab: bool


def read_layer_norm(model: nn.Module, path: str, d: int, op: str) -> LNParams:
    """The :class:`LNParams` of the LayerNorm at ``path``; ``TypeError`` for any other norm."""
    norm = model.get_submodule(path)
    if type(norm) is nn.LayerNorm and tuple(norm.normalized_shape) == (d,):
        return LNParams(norm.weight, norm.bias, float(norm.eps), normlab=False)
    if isinstance(norm, LayerNorm) and norm.channel_dim == -1 and norm.normalized_shape in (d, (d,)):
        # NormBase declares its affine as registered-or-None parameters; nn.Module's __getattr__ types them loosely.
        return LNParams(cast(Tensor | None, norm.weight), cast(Tensor | None, norm.bias), float(norm.eps), normlab=True)
    raise TypeError(
        f"{op}: expected a LayerNorm over the last axis of width {d} at {path}, got {type(norm).__name__}: {norm}"
    )


def plain_layer_norm(ln: LNParams, d: int, like: Tensor, *, keep_params: bool) -> nn.Module:
    """The parameter-free LayerNorm standing where ``ln`` was (same class family and eps, ``like``'s device and
    dtype); with ``keep_params`` it keeps γ = 1 and β = 0 as parameters."""
    if ln.normlab:
        return LayerNorm(d, eps=ln.eps, affine=keep_params, device=like.device, dtype=like.dtype)
    return nn.LayerNorm(d, eps=ln.eps, elementwise_affine=keep_params, device=like.device, dtype=like.dtype)


def prepare(model: nn.Module, op: str, inplace: bool) -> tuple[nn.Module, Stream, StreamSurgeryReport]:
    """Resolve and validate the stream (every norm a LayerNorm, every reader/writer a plain linear) on ``model``,
    then return the module to rewrite (``model`` or a deep copy), its stream and an empty report."""
    stream = resolve_stream(model, op)
    for path in stream.norms():
        read_layer_norm(model, path, stream.d_model, op)
    for block in stream.blocks:
        for path in (*block.attn_readers, *block.mlp_readers, block.attn_writer, block.mlp_writer, block.value[0]):
            read_linear(model, path, op)
    if stream.head is not None:
        read_linear(model, stream.head, op)
    for path in stream.embeddings:
        read_table(model, path)
    target = model if inplace else copy.deepcopy(model)
    return target, stream, StreamSurgeryReport(model=target, op=op, family=stream.smap.family, inplace=inplace)


def _fold_into(
    model: nn.Module, norm: str, readers: tuple[str, ...], ln: LNParams, report: StreamSurgeryReport, *, beta: bool
) -> None:
    ln_bias = ln.bias if beta else None
    for reader in readers:
        w, b = read_linear(model, reader, report.op)
        w, b = fold_ln_into_reader(w, b, ln.weight, ln_bias, center=True)
        write_linear(model, reader, w, b)
    what = ", ".join(n for n, t in (("γ", ln.weight), ("β", ln_bias)) if t is not None) or "nothing (no affine)"
    report.add(norm, "folded", f"{what} into {', '.join(readers)}; readers centred over d_model")


def _fold_final(
    model: nn.Module, stream: Stream, ln: LNParams, final_bias: FinalBias, report: StreamSurgeryReport
) -> bool:
    """Fold the final norm into the head; ``False`` when it stays as it is (no head, or β with nowhere to go)."""
    if stream.head is None:
        report.add(stream.final_norm or "", "kept", "no head reads the final norm; its affine is the model's output")
        return False
    head_bias = read_linear(model, stream.head, report.op)[1]
    beta_nonzero = ln.bias is not None and bool(ln.bias.detach().ne(0).any())
    if beta_nonzero and head_bias is None and final_bias != "head_bias":
        why = "final_bias='keep'" if final_bias == "keep" else "final_bias='auto'"
        report.add(
            stream.final_norm or "",
            "kept",
            f"γ and β left in the final norm ({why}: {stream.head} has no bias to take β; pass "
            "final_bias='head_bias' to give it one)",
        )
        return False
    untie_head(model, stream, report, "the final norm's γ is folded into the head only")
    # A zero β adds nothing: skip it rather than give a bias-free head an all-zero bias.
    _fold_into(model, stream.final_norm or "", (stream.head,), ln, report, beta=beta_nonzero)
    return True


def fold_stream_norms(
    model: nn.Module, stream: Stream, report: StreamSurgeryReport, final_bias: FinalBias, keep_ln_params: bool
) -> None:
    d = stream.d_model
    for block in stream.blocks:
        for norm, readers in block.norms():
            ln = read_layer_norm(model, norm, d, report.op)
            _fold_into(model, norm, readers, ln, report, beta=True)
            like = read_linear(model, readers[0], report.op)[0]
            set_module(model, norm, plain_layer_norm(ln, d, like, keep_params=keep_ln_params))
    if stream.final_norm is None:
        return
    ln = read_layer_norm(model, stream.final_norm, d, report.op)
    if _fold_final(model, stream, ln, final_bias, report):
        like = read_table(model, stream.token_embedding)
        set_module(model, stream.final_norm, plain_layer_norm(ln, d, like, keep_params=keep_ln_params))


def center_stream_writers(model: nn.Module, stream: Stream, report: StreamSurgeryReport, *, untie: bool = True) -> None:
    """Centre every stream writer over d_model (untying a tied head first unless ``untie=False``: the caller has
    checked that the head reads a zero-mean vector, on which the centred table acts as the original)."""
    if untie:
        untie_head(model, stream, report, "the token embedding is centred, the unembedding is not")
    for path in stream.embeddings:
        write_table(model, path, center_writer(read_table(model, path), dim=-1)[0])
        report.add(path, "centered", "each row over d_model")
    for path in stream.writers():
        w, b = read_linear(model, path, report.op)
        w, b = center_writer(w, b, dim=0)
        write_linear(model, path, w, b)
        report.add(path, "centered", "weight over its d_model output axis" + (", bias" if b is not None else ""))


def _center_unembed(model: nn.Module, stream: Stream, report: StreamSurgeryReport) -> None:
    if stream.head is None:
        return
    untie_head(model, stream, report, "the unembedding is centred over the vocabulary, the embedding is not")
    w, b = read_linear(model, stream.head, report.op)
    w, b = center_unembed_weights(w, b)
    write_linear(model, stream.head, w, b)
    report.add(stream.head, "centered", "over the vocabulary (log-probs unchanged)")


def _fold_value_biases(model: nn.Module, stream: Stream, report: StreamSurgeryReport, recenter: bool) -> None:
    for block in stream.blocks:
        path, chunk, chunks = block.value
        w_v, b_v = read_linear(model, path, report.op)
        if b_v is None:
            continue
        n = w_v.shape[0] // chunks
        rows = slice(chunk * n, (chunk + 1) * n)
        w_o, b_o = read_linear(model, block.attn_writer, report.op)
        if w_o.shape[1] != n:
            raise ValueError(
                f"{report.op}: {block.attn_writer} reads {w_o.shape[1]} features but the value projection writes {n} "
                "(grouped-query attention repeats value heads; not supported)"
            )
        new_b_o = fold_value_bias(w_o, b_o, b_v[rows])
        if recenter:
            new_b_o = new_b_o - new_b_o.double().mean().to(new_b_o.dtype)
        new_b_v = b_v.clone()
        new_b_v[rows] = 0
        write_linear(model, path, w_v, new_b_v)
        write_linear(model, block.attn_writer, w_o, new_b_o)
        report.add(block.attn_writer, "folded", f"value bias of {path} into its bias (b_O += W_O b_V; b_V = 0)")


def fold_ln(
    model: nn.Module,
    *,
    center_writing: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    final_bias: FinalBias = "auto",
    keep_ln_params: bool = False,
    inplace: bool = False,
) -> StreamSurgeryReport:
    """Fold every LayerNorm's affine into the layers reading it (TransformerLens ``fold_ln``), then optionally
    centre the writing weights, centre the unembedding and fold the value biases, in that order.

    Each block norm's ``b ← b + W β``, ``W ← W·diag(γ)``, then ``W`` is centred over d_model; the norm becomes a
    parameter-free LayerNorm (see the module docstring for its class and ``keep_ln_params``). The final norm folds into
    the head the same way, except that its β needs a head bias: ``final_bias="auto"`` folds it into the head's bias
    when the head has one and otherwise leaves the final norm whole (reported under ``report.kept``);
    ``"head_bias"`` gives a bias-free head a new ``bias`` parameter (GPT-2's ``lm_head``; such a model no longer
    loads into its original Hugging Face class, which has no ``lm_head.bias``); ``"keep"`` never moves β. A head tied
    to the token embedding is untied first (``tie_word_embeddings=False`` in a Hugging Face config).

    Exact in eval mode: log-probabilities are unchanged up to float rounding (logits too unless ``center_unembed``,
    which shifts them by a per-position constant). The arithmetic is float64, stored back in each tensor's dtype.

    Args:
        model: a Pre-LN Transformer with a residual-stream map (Hugging Face GPT-2, normlab ``DecoderLM`` with
            ``placement="pre"``).
        center_writing: then :func:`center_writing_weights`.
        center_unembed: then :func:`center_unembed`.
        fold_value_biases: then :func:`fold_value_biases` (re-centring ``b_O`` when ``center_writing``).
        final_bias: where the final norm's β goes, see above.
        keep_ln_params: keep the LayerNorms' parameters (γ = 1, β = 0) instead of making them parameter-free.
        inplace: rewrite ``model`` itself; default: a deep copy, returned as ``report.model``.

    Returns:
        A :class:`~normlab.surgery._residual.StreamSurgeryReport`.

    Raises:
        TypeError: a model type without a residual-stream map, a norm that is not a LayerNorm, a reader or writer
            that is not a plain linear. ValueError: a Post-LN model or unsupported options, a bad ``final_bias``.

    Example:
        >>> from normlab.models import DecoderLM, TransformerConfig
        >>> lm = DecoderLM(TransformerConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=32, bias=True)).eval()
        >>> report = fold_ln(lm)
        >>> type(report.model.final_norm).__name__, report.model.blocks[0].attn_in_norm.affine
        ('LayerNorm', False)
    """
    if final_bias not in ("auto", "head_bias", "keep"):
        raise ValueError(f"fold_ln: expected final_bias in ('auto', 'head_bias', 'keep'), got {final_bias!r}")
    target, stream, report = prepare(model, "fold_ln", inplace)
    fold_stream_norms(target, stream, report, final_bias, keep_ln_params)
    if center_writing:
        center_stream_writers(target, stream, report)
    if center_unembed:
        _center_unembed(target, stream, report)
    if fold_value_biases:
        _fold_value_biases(target, stream, report, recenter=center_writing)
    return report


def center_writing_weights(model: nn.Module, *, inplace: bool = False) -> StreamSurgeryReport:
    """Centre everything written into the residual stream over d_model: token and position embedding rows, the
    attention out-projection and FFN down-projection weights over their output axis, and their biases.

    Exact for a Pre-LN model (every reader behind a LayerNorm, which removes the mean): afterwards the stream is
    zero-mean. A head tied to the token embedding is untied first. Same arguments and errors as :func:`fold_ln`.
    """
    target, stream, report = prepare(model, "center_writing_weights", inplace)
    center_stream_writers(target, stream, report)
    return report


def center_unembed(model: nn.Module, *, inplace: bool = False) -> StreamSurgeryReport:
    """Centre the head over the vocabulary (``W_U − mean_vocab(W_U)``, ``b_U − mean(b_U)``): logits move by a
    per-position constant, log-probabilities do not. A tied head is untied first. Same arguments as :func:`fold_ln`.
    """
    target, stream, report = prepare(model, "center_unembed", inplace)
    _center_unembed(target, stream, report)
    return report


def fold_value_biases(model: nn.Module, *, inplace: bool = False) -> StreamSurgeryReport:
    """Fold each attention's value bias into its out-projection bias (``b_O ← b_O + W_O b_V``, ``b_V ← 0``).

    Exact when each query's attention weights sum to 1 (softmax attention in eval mode; attention dropout in train
    mode breaks it). Same arguments as :func:`fold_ln`.
    """
    target, stream, report = prepare(model, "fold_value_biases", inplace)
    _fold_value_biases(target, stream, report, recenter=False)
    return report
