"""Attention entropy per layer and head (D6), the entropy-collapse diagnostic of
σReparam (Zhai et al. 2023, https://arxiv.org/abs/2303.06296).

Fused attention (``F.scaled_dot_product_attention``) never materialises the probabilities, so
:class:`AttentionEntropy` intercepts each SDPA call with a :class:`~torch.overrides.TorchFunctionMode` and recomputes
``softmax(q kᵀ · scale + mask)`` from the exact ``q``, ``k``, mask and scale the model passed (after any QK-norm).
That covers normlab's models and Hugging Face models running their default ``sdpa`` attention; models with eager
attention can instead return ``attentions`` (``output_attentions=True``), see :meth:`AttentionEntropy.add_probs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from normlab.diagnostics._capture import MeanAcc, Row

__all__ = ["AttentionEntropy", "attention_probs", "entropy_per_query"]


def attention_probs(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention probabilities ``(B, H, L, S)`` in float64 as SDPA computes them, and the bool ``allowed`` mask
    (which keys each query may attend to), broadcast to the same shape.

    ``attn_mask`` is a bool mask (``True`` = may attend) or an additive float mask, as for SDPA.
    """
    qd, kd = q.detach().double(), k.detach().double()
    if kd.shape[-3] != qd.shape[-3] and (enable_gqa or qd.shape[-3] % kd.shape[-3] == 0):
        kd = kd.repeat_interleave(qd.shape[-3] // kd.shape[-3], dim=-3)
    sc = scale if scale is not None else 1.0 / math.sqrt(qd.shape[-1])
    logits = qd @ kd.transpose(-2, -1) * sc
    length, source = logits.shape[-2], logits.shape[-1]
    allowed = torch.ones(length, source, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = allowed.tril()
    allowed = allowed.expand(logits.shape)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            # Additive masks use -inf or the dtype's most negative value for blocked keys.
            am = attn_mask.double()
            allowed = allowed & (am > torch.finfo(attn_mask.dtype).min / 2)
            logits = logits + am.masked_fill(~torch.isfinite(am), 0.0)
    logits = logits.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs, allowed.expand(probs.shape)


def entropy_per_query(probs: Tensor) -> Tensor:
    """``−Σ_j A_ij log A_ij`` over the last axis (``0 log 0 = 0``), in float64.

    The σReparam paper's definition; the speech reference adds ``1e-6`` inside the log, which changes values by at
    most about ``n_keys · 1e-6``.
    """
    p = probs.double()
    return -torch.special.xlogy(p, p).sum(-1)


class AttentionEntropy:
    """Records the entropy of each layer's and head's attention, pooled over valid queries and batches.

    Use it as a context manager around forward passes; call :meth:`set_layer` (the collectors do it from block
    pre-hooks) so each SDPA call is attributed to its block, and :meth:`set_query_mask` with the batch's valid
    tokens so padded queries are not counted.

    Rows (``metric="attention_entropy"``): per ``layer`` and ``head`` and, without ``head``, the mean over heads;
    ``variant`` ``raw`` (nats) or ``normalized`` (divided by ``log`` of the number of keys the query may attend to,
    so uniform attention is 1 under any causal or padding mask; queries with one allowed key are left out of it).
    """

    def __init__(self) -> None:
        self.layer: int | None = None
        self.query_mask: Tensor | None = None
        self._acc = MeanAcc()
        self._calls = 0
        self._mode: _SDPARecorder | None = None

    def set_layer(self, layer: int | None) -> None:
        self.layer = layer

    def set_query_mask(self, mask: Tensor | None) -> None:
        """Bool ``(B, L)`` valid queries (the batch's attention mask), or ``None`` for all."""
        self.query_mask = mask

    def __enter__(self) -> AttentionEntropy:
        self._mode = _SDPARecorder(self._on_sdpa)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None

    @property
    def calls(self) -> int:
        """How many attention calls were recorded."""
        return self._calls

    def _on_sdpa(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        probs, allowed = attention_probs(
            bound["query"],
            bound["key"],
            bound.get("attn_mask"),
            bool(bound.get("is_causal", False)),
            bound.get("scale"),
            bool(bound.get("enable_gqa", False)),
        )
        self.add_probs(probs, allowed)

    def add_probs(self, probs: Tensor, allowed: Tensor | None = None, layer: int | None = None) -> None:
        """Add one layer's probabilities ``(B, H, L, S)`` (e.g. a Hugging Face ``attentions`` entry).

        ``allowed`` (bool, same shape) says which keys were attendable; by default every key with non-zero
        probability. ``layer`` defaults to the current layer, else the running call count.
        """
        if probs.dim() != 4:
            raise ValueError(f"AttentionEntropy: expected probabilities of size [B, H, L, S], got {list(probs.shape)}")
        self._calls += 1
        ell = layer if layer is not None else (self.layer if self.layer is not None else self._calls)
        if allowed is None:
            allowed = probs > 0
        ent = entropy_per_query(probs)  # (B, H, L)
        n_keys = allowed.sum(-1).double()
        b, h, length = ent.shape
        qmask = torch.ones(b, length, dtype=torch.bool, device=ent.device)
        if self.query_mask is not None and tuple(self.query_mask.shape) == (b, length):
            qmask = self.query_mask.to(ent.device).bool()
        qmask = qmask[:, None, :].expand(b, h, length)
        norm_ok = qmask & (n_keys > 1)
        normalized = ent / n_keys.clamp(min=2).log()
        for head in range(h):
            q_h, n_h = qmask[:, head], norm_ok[:, head]
            self._acc.add((ell, head, "raw"), float(ent[:, head][q_h].sum()), float(q_h.sum()))
            self._acc.add((ell, head, "normalized"), float(normalized[:, head][n_h].sum()), float(n_h.sum()))
        self._acc.add((ell, None, "raw"), float(ent[qmask].sum()), float(qmask.sum()))
        self._acc.add((ell, None, "normalized"), float(normalized[norm_ok].sum()), float(norm_ok.sum()))

    def rows(self) -> list[Row]:
        out: list[Row] = []
        for (layer, head, variant), value, count in self._acc.items():
            row: Row = {"metric": "attention_entropy", "layer": layer, "value": value, "variant": variant,
                        "count": count}
            if head is not None:
                row["head"] = head
            out.append(row)
        return sorted(out, key=lambda r: (r["variant"], r.get("head", -1), r["layer"]))


class _SDPARecorder(TorchFunctionMode):
    """Calls ``callback(args, kwargs)`` for every ``F.scaled_dot_product_attention`` call, then runs it unchanged."""

    def __init__(self, callback: Callable[[tuple[Any, ...], dict[str, Any]], None]) -> None:
        super().__init__()
        self.callback = callback

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.callback(args, kwargs)
        return func(*args, **kwargs)
