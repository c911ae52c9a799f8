"""Tensor-level residual-stream rewrites of a Pre-LN Transformer: LayerNorm affine folding, writer/unembedding
centring, value-bias folding, and the d → d−1 compression of Pre-CRMSNorm.

These are the pure functions behind :mod:`normlab.surgery.ln_fold` and :mod:`normlab.surgery.convert`. Every weight
is in torch ``nn.Linear`` layout (``W ∈ R^{out×in}``, ``y = W x + b``); an embedding table is ``(rows, d_model)``.
Each function computes in float64, casts its results back to the dtypes it was given and never mutates its inputs.

Why each rewrite is exact:

* A LayerNorm removes the mean of its input, so in a Pre-LN Transformer whose every reader of the residual stream
  sits behind a LayerNorm, the stream's mean is never read. Centring what is written into the stream (token and
  position embeddings, attention out-projection, FFN down-projection, their biases) therefore changes no output, and
  makes the stream zero-mean, where LayerNorm = RMSNorm with the same eps inside the root (Jiang et al. 2023,
  "Pre-RMSNorm and Pre-CRMSNorm Transformers", https://arxiv.org/abs/2305.14858, §3).
* ``W (γ ⊙ x̂ + β) + b = (W·diag(γ)) x̂ + (b + W β)`` folds a LayerNorm's affine into its readers; centring the
  folded reader over its input axis changes nothing on ``x̂`` (already zero-mean) and makes the reader ignore any
  ∝1 component of its input. This is TransformerLens's ``fold_ln`` (Nanda et al., TransformerLens).
* Softmax is shift-invariant, so centring the unembedding over the vocabulary changes logits by a per-position
  constant and log-probabilities not at all.
* Attention weights of one query sum to 1, so a value bias ``b_V`` adds the constant ``W_O b_V`` to every output
  position; it moves into the out-projection bias.
* A zero-mean ``x ∈ R^d`` is ``z = x[:d−1]`` with ``x_d = −Σ z``: a writer keeps its first ``d−1`` output rows and a
  reader ``W`` becomes ``W[:, :d−1] − W[:, d−1:]`` (Jiang et al. 2023, §3.3).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "center_unembed_weights",
    "center_writer",
    "compress_reader",
    "compress_writer",
    "fold_ln_into_reader",
    "fold_value_bias",
]


def _float(op: str, name: str, t: object, dims: tuple[int, ...]) -> Tensor:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{op}: expected {name} to be a floating-point tensor, got {got}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{op}: expected {name} to be {want}, got size {list(t.shape)}")
    return t.detach().double()


def _vector(op: str, name: str, t: Tensor | None, n: int) -> Tensor | None:
    if t is None:
        return None
    v = _float(op, name, t, (1,))
    if v.numel() != n:
        raise ValueError(f"{op}: expected {name} of size [{n}], got size {list(t.shape)}")
    return v


def fold_ln_into_reader(
    weight: Tensor,
    bias: Tensor | None,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    *,
    center: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Fold a LayerNorm's ``γ`` (``ln_weight``) and ``β`` (``ln_bias``) into a linear layer that reads its output.

    ``b' = b + W β`` (a missing ``b`` is taken as 0 and created when ``β`` is given), ``W' = W·diag(γ)``, then with
    ``center`` ``W'' = W' − mean_in(W')`` (each output row centred over the d_model input axis). Afterwards
    ``W'' x̂ + b' = W (γ ⊙ x̂ + β) + b`` for every zero-mean ``x̂``, in particular a parameter-free LayerNorm's output.

    Args:
        weight: ``(out, d)``.
        bias: ``(out,)`` or ``None``.
        ln_weight: ``(d,)`` or ``None`` (γ = 1).
        ln_bias: ``(d,)`` or ``None`` (β = 0).
        center: centre the folded weight over its input axis (TransformerLens ``center_weights=True``).

    Returns:
        ``(weight, bias)``; the bias is ``None`` only when both ``bias`` and ``ln_bias`` are ``None``.

    Example:
        >>> w, b = fold_ln_into_reader(torch.eye(2), None, torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]))
        >>> w, b
        (tensor([[ 1.0000, -1.0000],
                [-0.5000,  0.5000]]), tensor([1., 0.]))
    """
    op = "fold_ln_into_reader"
    w = _float(op, "weight", weight, (2,))
    d = w.shape[1]
    b = _vector(op, "bias", bias, w.shape[0])
    g = _vector(op, "ln_weight", ln_weight, d)
    beta = _vector(op, "ln_bias", ln_bias, d)
    new_b = b
    if beta is not None:
        new_b = (b if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)) + w @ beta
    if g is not None:
        w = w * g[None, :]
    if center:
        w = w - w.mean(dim=1, keepdim=True)
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return w.to(weight.dtype), (new_b.to(bias_dtype) if new_b is not None else None)


def center_writer(weight: Tensor, bias: Tensor | None = None, *, dim: int = 0) -> tuple[Tensor, Tensor | None]:
    """Centre what a layer writes into the residual stream over the stream (d_model) axis ``dim``.

    ``dim=0`` for a torch linear weight ``(d, in)`` (each input column centred over the output rows); ``dim=-1`` for
    an embedding table ``(rows, d)`` (each row centred). ``bias`` (``(d,)``) loses its mean.

    Example:
        >>> center_writer(torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([1.0, 3.0]))
        (tensor([[-1., -1.],
                [ 1.,  1.]]), tensor([-1.,  1.]))
    """
    op = "center_writer"
    w = _float(op, "weight", weight, (1, 2, 3))
    if not -w.dim() <= dim < w.dim():
        raise ValueError(f"{op}: expected dim in [{-w.dim()}, {w.dim() - 1}] for a {w.dim()}-D weight, got {dim}")
    b = _vector(op, "bias", bias, w.shape[dim])
    w = w - w.mean(dim=dim, keepdim=True)
    new_b = (b - b.mean()).to(bias.dtype) if b is not None and bias is not None else None
    return w.to(weight.dtype), new_b


def center_unembed_weights(weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Centre an unembedding (LM head, torch layout ``(vocab, d)``) over the vocabulary: ``W − mean_vocab(W)``
    (each d_model column) and ``b − mean(b)``. Logits move by a per-position constant; log-softmax is unchanged.

    Example:
        >>> center_unembed_weights(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 2.0]))
        (tensor([[-1.],
                [ 1.]]), tensor([-1.,  1.]))
    """
    op = "center_unembed_weights"
    w = _float(op, "weight", weight, (2,))
    b = _vector(op, "bias", bias, w.shape[0])
    w = w - w.mean(dim=0, keepdim=True)
    new_b = (b - b.mean()).to(bias.dtype) if b is not None and bias is not None else None
    return w.to(weight.dtype), new_b


def fold_value_bias(out_weight: Tensor, out_bias: Tensor | None, value_bias: Tensor) -> Tensor:
    """The attention out-projection bias after folding the value bias: ``b_O + W_O b_V`` (the value bias is then 0).

    ``out_weight`` is ``(d, H·d_head)`` and ``value_bias`` ``(H·d_head,)`` with the heads in the order the
    out-projection reads them (one value head per query head: grouped-query attention needs ``b_V`` repeated first).
    Exact because each query's attention weights sum to 1 (no attention dropout, i.e. eval mode).

    Example:
        >>> fold_value_bias(torch.tensor([[1.0, 2.0]]), torch.tensor([0.5]), torch.tensor([1.0, -1.0]))
        tensor([-0.5000])
    """
    op = "fold_value_bias"
    w = _float(op, "out_weight", out_weight, (2,))
    b = _vector(op, "out_bias", out_bias, w.shape[0])
    v = _float(op, "value_bias", value_bias, (1,))
    if v.numel() != w.shape[1]:
        raise ValueError(f"{op}: expected value_bias of size [{w.shape[1]}], got size {list(value_bias.shape)}")
    new = (b if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)) + w @ v
    return new.to(out_bias.dtype if out_bias is not None else out_weight.dtype)


def compress_reader(weight: Tensor) -> Tensor:
    """A reader of a zero-mean d-vector rewritten to read its first ``d−1`` coordinates:
    ``W' = W[:, :d−1] − W[:, d−1:d]``, so that ``W' x[:d−1] = W x`` whenever ``Σ x = 0``. Biases are unchanged.

    Example:
        >>> compress_reader(torch.tensor([[1.0, 2.0, 5.0]]))
        tensor([[-4., -3.]])
    """
    w = _float("compress_reader", "weight", weight, (2,))
    if w.shape[1] < 2:
        raise ValueError(f"compress_reader: expected a weight with at least 2 input columns, got {list(w.shape)}")
    return (w[:, :-1] - w[:, -1:]).to(weight.dtype)


def compress_writer(weight: Tensor, bias: Tensor | None = None, *, dim: int = 0) -> tuple[Tensor, Tensor | None]:
    """A writer of a zero-mean d-vector keeping its first ``d−1`` stream coordinates (along ``dim``: ``0`` for a
    linear weight ``(d, in)``, ``-1`` for an embedding table ``(rows, d)``); the dropped one is ``−Σ`` of the rest.

    Example:
        >>> compress_writer(torch.tensor([[1.0], [-1.0]]), torch.tensor([2.0, -2.0]))
        (tensor([[1.]]), tensor([2.]))
    """
    op = "compress_writer"
    w = _float(op, "weight", weight, (1, 2, 3))
    if not -w.dim() <= dim < w.dim():
        raise ValueError(f"{op}: expected dim in [{-w.dim()}, {w.dim() - 1}] for a {w.dim()}-D weight, got {dim}")
    if w.shape[dim] < 2:
        raise ValueError(f"{op}: expected at least 2 stream coordinates along dim {dim}, got {list(w.shape)}")
    b = _vector(op, "bias", bias, w.shape[dim])
    keep = w.shape[dim] - 1
    new_w = w.narrow(dim, 0, keep).to(weight.dtype)
    return new_w, (b[:keep].to(bias.dtype) if b is not None and bias is not None else None)
