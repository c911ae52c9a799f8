"""Tensor-level folding of an eval-mode per-channel affine ``n(x) = a ⊙ x + c`` into an adjacent linear or conv layer.

These are the pure functions behind :func:`normlab.surgery.fold_norms` (PyTorch pairs
``torch.nn.utils.fuse_conv_bn_weights`` with ``fuse_conv_bn_eval`` the same way). Every function computes in float64
and casts the results back to the dtypes of the weight (and bias) it was given; none mutates its inputs.

Two directions (BatchNorm's inference form, Ioffe & Szegedy 2015 §3.1 and Algorithm 2, moved into a neighbour):

* norm **before** the layer (pre-norm Transformers: BN / RepBN / UN / PN feeding q, k, v, fc1, gate, up, an LM head):
  ``y = W (a ⊙ x + c) + b = W' x + b'`` with ``W' = W·diag(a)`` and ``b' = b + W c``;
* norm **after** the layer (PyTorch's conv→BN fusion, SLAB's PatchEmbed, Peri-LN output norms):
  ``y = a ⊙ (W x + b) + c = W' x + b'`` with ``W' = diag(a)·W`` and ``b' = a ⊙ b + c``.

A conv after a norm folds exactly only when the conv never sees padding the norm did not produce: with zero padding
the border taps read ``0`` where the unfolded model reads ``n(0) = c`` ≠ 0, so the bias fold is wrong at the borders
and :func:`fold_affine_into_conv_input` refuses. Reflect/replicate/circular padding copies normalized values, so it
folds exactly.

Papers: BatchNorm (https://arxiv.org/abs/1502.03167); SLAB / RepBN re-parameterisation
(https://arxiv.org/abs/2405.11582); PowerNorm (https://arxiv.org/abs/2003.07845); Unified Normalization
(https://arxiv.org/abs/2208.01313).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "fold_affine_into_conv_input",
    "fold_affine_into_conv_output",
    "fold_affine_into_linear_input",
    "fold_affine_into_linear_output",
]


def _check_weight(op: str, weight: Tensor, min_dim: int, max_dim: int) -> None:
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, Tensor) else type(weight).__name__
        raise TypeError(f"{op}: expected weight to be a floating-point tensor, got {got}")
    if not min_dim <= weight.dim() <= max_dim:
        want = f"{min_dim}-D" if min_dim == max_dim else f"{min_dim}-D to {max_dim}-D"
        raise ValueError(f"{op}: expected a {want} weight, got size {list(weight.shape)}")


def _affine64(op: str, scale: Tensor, shift: Tensor, n: int, what: str) -> tuple[Tensor, Tensor]:
    """Validate ``scale``/``shift`` as finite 1-D tensors of length ``n`` and return them in float64."""
    for name, t in (("scale", scale), ("shift", shift)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{op}: expected {name} to be a floating-point tensor, got {got}")
        if t.dim() != 1 or t.numel() != n:
            raise ValueError(f"{op}: expected {name} of size [{n}] ({what}), got size {list(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{op}: {name} has non-finite entries (a running variance near 0 with eps=0?)")
    return scale.detach().double(), shift.detach().double()


def _bias64(op: str, bias: Tensor | None, n: int) -> Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, Tensor) or bias.dim() != 1 or bias.numel() != n:
        got = list(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{op}: expected bias of size [{n}] or None, got {got}")
    return bias.detach().double()


def _cast(weight: Tensor, bias: Tensor | None, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Cast the float64 results back: the weight's dtype for W', the bias's dtype for b' (the weight's if none)."""
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return w.to(weight.dtype), b.to(bias_dtype)


def fold_affine_into_linear_input(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Fold a norm **before** an ``nn.Linear``: ``W (a⊙x + c) + b == W' x + b'``.

    Args:
        weight: ``(out, in)`` in torch's layout (``y = W x + b``).
        bias: ``(out,)`` or ``None`` (a bias is created: the fold needs one unless ``W c = 0``).
        scale: ``a``, ``(in,)``.
        shift: ``c``, ``(in,)``.

    Returns:
        ``(W', b')`` with ``W' = W·diag(a)`` (columns scaled) and ``b' = b + W c``, cast to the input dtypes.

    Example (a norm before a Linear):
        >>> w, b = fold_affine_into_linear_input(torch.tensor([[1.0, 2], [3, -1]]), None,
        ...                                      torch.tensor([0.5, 2.0]), torch.tensor([1.0, 0.0]))
        >>> w.tolist(), b.tolist()
        ([[0.5, 4.0], [1.5, -2.0]], [1.0, 3.0])
    """
    op = "fold_affine_into_linear_input"
    _check_weight(op, weight, 2, 2)
    out_f, in_f = weight.shape
    a, c = _affine64(op, scale, shift, in_f, "the linear layer's in_features")
    b = _bias64(op, bias, out_f)
    w = weight.detach().double()
    b_new = w @ c if b is None else b + w @ c
    return _cast(weight, bias, w * a[None, :], b_new)


def fold_affine_into_linear_output(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Fold a norm **after** an ``nn.Linear``: ``a⊙(W x + b) + c == W' x + b'`` (the direction of
    ``torch.nn.utils.fuse_linear_bn_eval``).

    Args:
        weight: ``(out, in)``.
        bias: ``(out,)`` or ``None`` (then ``b' = c``).
        scale: ``a``, ``(out,)``.
        shift: ``c``, ``(out,)``.

    Returns:
        ``(W', b')`` with ``W' = diag(a)·W`` (rows scaled) and ``b' = a⊙b + c``.
    """
    op = "fold_affine_into_linear_output"
    _check_weight(op, weight, 2, 2)
    out_f = weight.shape[0]
    a, c = _affine64(op, scale, shift, out_f, "the linear layer's out_features")
    b = _bias64(op, bias, out_f)
    w = weight.detach().double()
    return _cast(weight, bias, a[:, None] * w, c if b is None else a * b + c)


def fold_affine_into_conv_output(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold a norm **after** a conv (``ConvNd`` or ``ConvTransposeNd``): ``a⊙conv(x) + c`` per output channel.

    Exact for any padding: the affine acts on the conv's output, after the padding was read.

    Args:
        weight: ``(out, in/groups, *k)``, or ``(in, out/groups, *k)`` when ``transposed``.
        bias: ``(out,)`` or ``None``.
        scale: ``a``, ``(out,)``.
        shift: ``c``, ``(out,)``.
        transposed: the weight belongs to a transposed conv.
        groups: the conv's ``groups`` (a transposed conv's output channels are split across groups).

    Returns:
        ``(W', b')`` with every output channel ``o`` of ``W`` scaled by ``a_o`` and ``b' = a⊙b + c``.
    """
    op = "fold_affine_into_conv_output"
    _check_weight(op, weight, 3, 5)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: expected groups to be an int >= 1, got {groups!r}")
    k = weight.shape[2:]
    w = weight.detach().double()
    if transposed:
        if weight.shape[0] % groups != 0:
            raise ValueError(f"{op}: weight size {list(weight.shape)} has in_channels not divisible by groups={groups}")
        out_per_group = weight.shape[1]
        a, c = _affine64(op, scale, shift, out_per_group * groups, "the transposed conv's out_channels")
        # (in, out/g, *k) -> (g, in/g, out/g, *k); output channel o = group * (out/g) + j.
        wg = w.reshape(groups, weight.shape[0] // groups, out_per_group, *k)
        w_new = (wg * a.reshape(groups, 1, out_per_group, *([1] * len(k)))).reshape(weight.shape)
    else:
        a, c = _affine64(op, scale, shift, weight.shape[0], "the conv's out_channels")
        w_new = w * a.reshape(-1, *([1] * (weight.dim() - 1)))
    b = _bias64(op, bias, a.numel())
    return _cast(weight, bias, w_new, c if b is None else a * b + c)


def _padding_is_zero(padding: int | str | Sequence[int], kernel: Sequence[int]) -> bool:
    if isinstance(padding, str):
        if padding == "valid":
            return True
        if padding == "same":
            return all(s == 1 for s in kernel)  # "same" pads (k - 1) * dilation in total per axis
        raise ValueError(f"fold_affine_into_conv_input: expected padding 'valid', 'same' or ints, got {padding!r}")
    if isinstance(padding, int):
        return padding == 0
    return all(int(p) == 0 for p in padding)


def fold_affine_into_conv_input(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    groups: int = 1,
    padding: int | str | Sequence[int] = 0,
    padding_mode: str = "zeros",
) -> tuple[Tensor, Tensor]:
    """Fold a channel-first norm **before** a (non-transposed) conv: ``conv(a⊙x + c) == conv'(x)``.

    Refuses zero padding (``padding_mode="zeros"`` with a non-zero ``padding``): the padded taps read 0 in both
    models, but in the unfolded one that 0 stands beside normalized values whose shift ``c`` is not applied to it,
    so ``b'`` would be wrong at every border position. Other padding modes pad with copies of normalized inputs and
    fold exactly.

    Args:
        weight: ``(out, in/groups, *k)``.
        bias: ``(out,)`` or ``None``.
        scale: ``a``, ``(in,)``.
        shift: ``c``, ``(in,)``.
        groups: the conv's ``groups``.
        padding: the conv's ``padding``.
        padding_mode: the conv's ``padding_mode``.

    Returns:
        ``(W', b')``: ``W'[o, j, ...] = W[o, j, ...]·a_i`` and ``b'_o = b_o + Σ_{j,k} W[o, j, k]·c_i`` where ``i`` is
        the input channel that weight column ``j`` of output ``o``'s group reads.

    Raises:
        ValueError: zero padding (not exact), or sizes that do not match.
    """
    op = "fold_affine_into_conv_input"
    _check_weight(op, weight, 3, 5)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups != 0:
        raise ValueError(f"{op}: expected groups an int >= 1 dividing out_channels={weight.shape[0]}, got {groups!r}")
    if padding_mode == "zeros" and not _padding_is_zero(padding, weight.shape[2:]):
        raise ValueError(
            f"{op}: a conv with zero padding (padding={padding!r}, padding_mode='zeros') after a norm cannot be folded "
            "exactly: the padded border taps would miss the norm's shift; use padding_mode 'reflect', 'replicate' or "
            "'circular', or fold the norm into the layer before it"
        )
    out_c, in_per_group = weight.shape[0], weight.shape[1]
    a, c = _affine64(op, scale, shift, in_per_group * groups, "the conv's in_channels")
    b = _bias64(op, bias, out_c)
    w = weight.detach().double()
    spatial = [1] * (weight.dim() - 2)
    # Per output channel o (group o // (out/g)), the in/g input channels it reads.
    a_rows = a.reshape(groups, 1, in_per_group).expand(groups, out_c // groups, in_per_group).reshape(out_c, -1)
    c_rows = c.reshape(groups, 1, in_per_group).expand(groups, out_c // groups, in_per_group).reshape(out_c, -1)
    w_new = w * a_rows.reshape(out_c, in_per_group, *spatial)
    wc = (w.reshape(out_c, in_per_group, -1).sum(-1) * c_rows).sum(-1)
    return _cast(weight, bias, w_new, wc if b is None else b + wc)
