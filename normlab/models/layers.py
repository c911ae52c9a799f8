"""Building blocks of the reference Transformers: per-slot norm construction, attention with QK-norm and
NormFormer head scale, and the GELU / SwiGLU feed-forward networks.

Papers: QKNorm (Henry et al. 2020, https://arxiv.org/abs/2010.04245), per-head / joint RMS QK-norm (Gemma 3,
OLMo 2, https://arxiv.org/abs/2501.00656), NormFormer (Shleifer et al. 2021, https://arxiv.org/abs/2110.09456),
σReparam (Zhai et al. 2023, https://arxiv.org/abs/2303.06296), SwiGLU (Shazeer 2020, https://arxiv.org/abs/2002.05202).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.models.config import TransformerConfig
from normlab.nn.sigma_reparam import SigmaReparamLinear
from normlab.registry import NormSpec, create_norm, get_norm
from normlab.walk import spec_of

__all__ = ["MLP", "Attention", "apply_norm", "build_slot_norm", "is_batch_dependent", "make_linear", "norm_key"]


def norm_key(choice: Any) -> str | None:
    """Registry name of a norm choice (a key or a registered class), or ``None`` for a partial / unregistered class."""
    if isinstance(choice, str):
        return get_norm(choice).name
    spec = getattr(choice, "norm_spec", None)
    if isinstance(spec, NormSpec) and spec.cls is choice:
        return spec.name
    return None


def is_batch_dependent(module: nn.Module) -> bool:
    """Whether a norm module's train-mode output mixes samples (so it needs the mask): its ``batch_dependent`` trait
    as :func:`normlab.walk.spec_of` reads it (subclasses of a registered norm included)."""
    spec = spec_of(module)
    return spec is not None and spec.batch_dependent


def apply_norm(norm: nn.Module | None, x: Tensor, mask: Tensor | None) -> Tensor:
    """``norm(x)``, passing the padding mask to batch-statistic norms.

    ``mask`` is ``(B, N)`` (``True`` = valid); for inputs with more axes before the channel axis (per-head q/k,
    ``(B, N, H, d_head)``) it is broadcast to ``x.shape[:-1]``.
    """
    if norm is None:
        return x
    if mask is not None and is_batch_dependent(norm):
        if mask.shape != x.shape[:-1]:
            mask = mask.reshape(*mask.shape, *([1] * (x.dim() - 1 - mask.dim()))).expand(x.shape[:-1])
        return norm(x, mask=mask)
    return norm(x)


def build_slot_norm(
    config: TransformerConfig,
    slot: str,
    width: int,
    *,
    default: str | type | Callable[..., Any] | None = None,
    dyt_alpha: Mapping[str, float] | None = None,
) -> nn.Module | None:
    """Build the norm of one slot: ``config.norm`` (or ``default``) with ``config.norm_kwargs``, unless
    ``config.norm_overrides[slot]`` says otherwise (see :class:`TransformerConfig`).

    ``dyt_alpha`` maps slots to the DyT ``alpha_init`` used when the slot's norm is ``dyt`` and no ``alpha_init`` was
    given explicitly.
    """
    if default is None:
        choice: Any = config.norm
        kwargs: dict[str, Any] = dict(config.norm_kwargs)
    else:
        choice, kwargs = default, {}
    if slot in config.norm_overrides:
        override = config.norm_overrides[slot]
        if override is None:
            return None
        if isinstance(override, Mapping):
            if "norm" in override:
                choice, kwargs = override["norm"], dict(override.get("kwargs", {}))
            else:
                kwargs = {**kwargs, **override.get("kwargs", {})}
        else:
            choice, kwargs = override, {}
    if dyt_alpha is not None and slot in dyt_alpha and "alpha_init" not in kwargs and norm_key(choice) == "dyt":
        kwargs["alpha_init"] = dyt_alpha[slot]
    kwargs.setdefault("channel_dim", -1)
    return create_norm(choice, width, **kwargs)


def make_linear(config: TransformerConfig, in_features: int, out_features: int) -> nn.Module:
    """``nn.Linear`` or, with ``config.sigma_reparam``, :class:`~normlab.nn.sigma_reparam.SigmaReparamLinear`."""
    if config.sigma_reparam:
        return SigmaReparamLinear(in_features, out_features, bias=config.bias)
    return nn.Linear(in_features, out_features, bias=config.bias)


class Attention(nn.Module):
    r"""Multi-head self-attention with optional QK-norm and NormFormer head scale.

    ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` are linear layers (``nn.Linear``, or σReparam linears).
    QK-norm (``config.qk_norm``):

    - ``"l2"`` (QKNorm): ``q̂ = q/‖q‖``, ``k̂ = k/‖k‖`` per head and logits ``g · q̂ᵀk̂`` with one learnable scalar
      ``qk_scale`` = g per module, init ``log2(T² − T)``; the ``1/sqrt(d_head)`` factor is dropped.
    - ``"rms"`` / ``"layer"``: ``q_norm`` and ``k_norm`` (``rms_norm`` / ``layer_norm`` or the ``"qk"`` override)
      over ``d_head`` per head (weights shared across heads) or over ``d_model`` jointly; logits keep
      ``1/sqrt(d_head)``.

    ``head_scale`` (NormFormer, ``H`` scalars init 1) multiplies each head's context **before** ``out_proj``, as in
    the paper (fairseq applies it after ``out_proj``, a speed-up the author puts at ±0.02 perplexity in
    facebookresearch/fairseq#3973).

    Args:
        config: the model config.
        n_tokens: the sequence length ``T`` used for the QKNorm scale init.
        head_scale: create NormFormer's ``head_scale``.
    """

    def __init__(self, config: TransformerConfig, *, n_tokens: int, head_scale: bool = False) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.d_head = config.d_head
        self.qk_norm_kind = config.qk_norm
        self.qk_norm_per_head = config.qk_norm_per_head
        self.dropout = config.dropout
        self.q_proj = make_linear(config, d, d)
        self.k_proj = make_linear(config, d, d)
        self.v_proj = make_linear(config, d, d)
        self.out_proj = make_linear(config, d, d)
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        self.qk_scale: nn.Parameter | None = None
        if config.qk_norm in ("rms", "layer"):
            width = self.d_head if config.qk_norm_per_head else d
            default = "rms_norm" if config.qk_norm == "rms" else "layer_norm"
            self.q_norm = build_slot_norm(config, "qk", width, default=default)
            self.k_norm = build_slot_norm(config, "qk", width, default=default)
        elif config.qk_norm == "l2":
            self.qk_scale_init = self.l2_scale_init(n_tokens)
            self.qk_scale = nn.Parameter(torch.tensor(self.qk_scale_init))
        self.head_scale = nn.Parameter(torch.ones(config.n_heads)) if head_scale else None

    @staticmethod
    def l2_scale_init(n_tokens: int) -> float:
        """QKNorm's ``g₀ = log2(T² − T)`` with ``T`` the training sequence length (clamped to ``T ≥ 2``)."""
        t = max(int(n_tokens), 2)
        return math.log2(t * t - t)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        """``x``: ``(B, N, d_model)``; ``mask``: ``(B, N)`` valid tokens (for batch-statistic q/k norms);
        ``attn_mask``: boolean ``(B, 1, N, N)`` (``True`` = may attend) or ``None`` with ``is_causal``."""
        b, n, d = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None and not self.qk_norm_per_head:
            q, k = apply_norm(self.q_norm, q, mask), apply_norm(self.k_norm, k, mask)
        q, k, v = (t.view(b, n, self.n_heads, self.d_head) for t in (q, k, v))
        if self.q_norm is not None and self.qk_norm_per_head:
            q, k = apply_norm(self.q_norm, q, mask), apply_norm(self.k_norm, k, mask)
        scale: float | None = None
        if self.qk_scale is not None:
            q = F.normalize(q, dim=-1) * self.qk_scale
            k = F.normalize(k, dim=-1)
            scale = 1.0
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        ctx = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and attn_mask is None,
            scale=scale,
        )
        ctx = ctx.transpose(1, 2)  # (B, N, H, d_head)
        if self.head_scale is not None:
            ctx = ctx * self.head_scale.view(1, 1, -1, 1).to(ctx.dtype)
        return self.out_proj(ctx.reshape(b, n, d))


class MLP(nn.Module):
    """Feed-forward network: ``fc2(GELU(fc1 x))`` or SwiGLU ``down_proj(silu(gate_proj x) * up_proj x)``.

    With ``inner_norm`` (NormFormer's FFN LN, Shleifer et al. 2021, §2) the hidden is normalised after the activation
    and before the output projection: ``fc2(N(GELU(fc1 x)))``.
    """

    def __init__(self, config: TransformerConfig, *, inner_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.kind = config.mlp
        d, h = config.d_model, config.d_ffn
        if self.kind == "gelu":
            self.fc1 = make_linear(config, d, h)
            self.fc2 = make_linear(config, h, d)
        else:
            self.gate_proj = make_linear(config, d, h)
            self.up_proj = make_linear(config, d, h)
            self.down_proj = make_linear(config, h, d)
        self.inner_norm = inner_norm

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.kind == "gelu":
            return self.fc2(apply_norm(self.inner_norm, F.gelu(self.fc1(x)), mask))
        hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(apply_norm(self.inner_norm, hidden, mask))
