"""One parameterised Transformer block that expresses every placement scheme of ``shared/specs/placement.md`` §13.

Post-LN (https://arxiv.org/abs/1706.03762), Pre-LN (https://arxiv.org/abs/2002.04745), Peri-LN
(https://arxiv.org/abs/2502.02732), Sandwich-LN (https://arxiv.org/abs/2105.13290), Mix-LN
(https://arxiv.org/abs/2412.13795), LayerNorm Scaling (https://arxiv.org/abs/2502.05795), DeepNorm
(https://arxiv.org/abs/2203.00555), NormFormer (https://arxiv.org/abs/2110.09456).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor, nn

from normlab.models.config import TransformerConfig, deepnorm_coefficients
from normlab.models.layers import MLP, Attention, apply_norm, build_slot_norm

__all__ = ["BLOCK_PLACEMENTS", "Block"]

# Effective per-block placements (Mix-LN resolves to "post" or "pre" per block).
BLOCK_PLACEMENTS = ("pre", "post", "peri", "lns", "deepnorm", "sandwich", "normformer")
_INPUT_NORM = ("pre", "peri", "lns", "sandwich", "normformer")  # position A on both sublayers
_AFTER_ADD = ("post", "deepnorm")  # position C on both sublayers
_BRANCH_BOTH = ("peri", "sandwich")  # position B on both sublayers


class Block(nn.Module):
    r"""Transformer block with the norm placement of one scheme.

    Per sublayer ``F`` (attention, then FFN) with skip ``x`` (spec notation: A = input norm, B = branch-output
    norm, C = norm after the residual add):

    ============  =====================================================  ==============================
    placement     equation                                               norms
    ============  =====================================================  ==============================
    pre           ``x + F(N_in(x))``                                     A
    lns           ``x + F(N_in(x) / sqrt(ℓ))``                           A, scaled by ``branch_scale``
    peri          ``x + N_out(F(N_in(x)))``                              A + B
    sandwich      same as peri (the model adds scaled init)              A + B
    normformer    attn: ``x + N_out(HeadScale-MHA(N_in(x)))``;            A, B on attention only,
                  FFN: ``x + fc2(N_inner(act(fc1 N_in(x))))``            FFN inner norm, head scale
    post          ``N_out(x + F(x))``                                    C
    deepnorm      ``N_out(α x + F(x))``                                  C, ``resid_alpha`` = α
    ============  =====================================================  ==============================

    The slot attributes are ``attn_in_norm``, ``attn_out_norm``, ``mlp_in_norm``, ``mlp_out_norm`` (``None``
    where the placement has no such norm). ``*_out_norm`` is position B or C depending on the placement; read
    ``out_norm_position`` (``"branch"``, ``"after_add"`` or ``None``) rather than the name (spec §1.2 warns about
    exactly this trap). Dropout acts on the branch output after any B norm, before the add.

    Attributes:
        placement: the effective placement of this block (Mix-LN blocks are ``"post"`` or ``"pre"``).
        layer_idx: 1-based block index ℓ.
        resid_alpha: multiplier of the skip path (DeepNorm α, else 1).
        branch_scale: constant multiplying the input-norm outputs (LNS ``1/sqrt(ℓ)``, else 1).
        out_norm_position: where ``attn_out_norm``/``mlp_out_norm`` sit.

    Args:
        config: the model config.
        layer_idx: 1-based block index.
        placement: the effective placement, one of :data:`BLOCK_PLACEMENTS`.
        n_tokens: sequence length for the QKNorm scale init.
        arch: ``"decoder"`` or ``"encoder"``, for the DeepNorm α.
        dyt_alpha: per-slot DyT ``alpha_init`` defaults (see :func:`~normlab.models.layers.build_slot_norm`).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_idx: int,
        placement: str,
        *,
        n_tokens: int,
        arch: str = "decoder",
        dyt_alpha: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if placement not in BLOCK_PLACEMENTS:
            raise ValueError(f"Block: expected placement in {BLOCK_PLACEMENTS}, got {placement!r}")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 1:
            raise ValueError(f"Block: expected a 1-based layer_idx >= 1, got {layer_idx!r}")
        self.placement = placement
        self.layer_idx = layer_idx
        self.resid_alpha = deepnorm_coefficients(config.n_layers, arch)[0] if placement == "deepnorm" else 1.0
        self.branch_scale = 1.0 / math.sqrt(layer_idx) if placement == "lns" else 1.0
        d = config.d_model

        def norm(slot: str, width: int = d) -> nn.Module | None:
            return build_slot_norm(config, slot, width, dyt_alpha=dyt_alpha)

        has_in = placement in _INPUT_NORM
        if placement in _AFTER_ADD:
            self.out_norm_position: str | None = "after_add"
        elif placement in _BRANCH_BOTH or placement == "normformer":
            self.out_norm_position = "branch"
        else:
            self.out_norm_position = None
        has_attn_out = self.out_norm_position is not None
        has_mlp_out = placement in _AFTER_ADD or placement in _BRANCH_BOTH
        # Registered in forward order: attn_in, attn_out, mlp_in, mlp_out.
        self.attn_in_norm = norm("attn_in") if has_in else None
        self.attn_out_norm = norm("attn_out") if has_attn_out else None
        self.mlp_in_norm = norm("mlp_in") if has_in else None
        self.mlp_out_norm = norm("mlp_out") if has_mlp_out else None
        normformer = placement == "normformer"
        self.attn = Attention(config, n_tokens=n_tokens, head_scale=normformer)
        self.mlp = MLP(config, inner_norm=norm("mlp_inner", config.d_ffn) if normformer else None)
        self.drop = nn.Dropout(config.dropout)

    def _branch_input(self, norm: nn.Module | None, x: Tensor, mask: Tensor | None) -> Tensor:
        h = apply_norm(norm, x, mask)
        return h * self.branch_scale if self.branch_scale != 1.0 else h

    def _combine(self, x: Tensor, y: Tensor, out_norm: nn.Module | None, mask: Tensor | None) -> Tensor:
        skip = x * self.resid_alpha if self.resid_alpha != 1.0 else x
        if self.out_norm_position == "after_add":
            return apply_norm(out_norm, skip + self.drop(y), mask)
        if out_norm is not None:  # position B
            y = apply_norm(out_norm, y, mask)
        return skip + self.drop(y)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        """``x``: ``(B, N, d_model)``; ``mask``: ``(B, N)`` bool valid tokens, passed to batch-statistic norms;
        ``attn_mask``/``is_causal``: as :meth:`Attention.forward`."""
        y = self.attn(self._branch_input(self.attn_in_norm, x, mask), mask, attn_mask, is_causal)
        x = self._combine(x, y, self.attn_out_norm, mask)
        y = self.mlp(self._branch_input(self.mlp_in_norm, x, mask), mask)
        return self._combine(x, y, self.mlp_out_norm, mask)

    def extra_repr(self) -> str:
        return (
            f"placement={self.placement!r}, layer_idx={self.layer_idx}, resid_alpha={self.resid_alpha:.4g}, "
            f"branch_scale={self.branch_scale:.4g}"
        )
