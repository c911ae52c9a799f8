"""One parameterised Transformer block that expresses every placement of the placement table
(:mod:`normlab.models.placement`, which lists the papers).

Per sublayer ``F`` the block computes ``x ← N_C(α·x + N_B(F(s · N_A(x))))``; the block's placement row says which
of the norms exist, where its ``*_out`` norm sits (B or C), α and s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from normlab.models.config import TransformerConfig
from normlab.models.layers import MLP, Attention, apply_norm, build_slot_norm
from normlab.models.placement import PLACEMENT_SPECS

__all__ = ["BLOCK_PLACEMENTS", "Block"]

# Effective per-block placements: every row of the table except those that mix two others (Mix-LN resolves to
# "post" or "pre" per block).
BLOCK_PLACEMENTS = tuple(name for name, spec in PLACEMENT_SPECS.items() if spec.is_block_placement)


def _scaled(t: Tensor, c: float) -> Tensor:
    """``c · t``, skipping the multiply (and its autograd node) when ``c`` is 1."""
    return t if c == 1.0 else t * c


class Block(nn.Module):
    r"""Transformer block with the norm placement of one row of the placement table.

    Every placement is one equation per sublayer ``F`` (attention, then FFN), with A = input norm, B = branch-output
    norm, C = norm after the residual add, and an absent norm the identity::

        x ← N_C(α·x + Drop(N_B(F(s · N_A(x)))))

    The block's row (:data:`~normlab.models.placement.PLACEMENT_SPECS`) says which norms exist, α and s:

    ============  =====================================================  ==============================
    placement     equation                                               norms
    ============  =====================================================  ==============================
    pre           ``x + F(N_in(x))``                                     A
    lns           ``x + F(N_in(x) / sqrt(ℓ))``                           A, scaled by ``branch_scale``
    peri          ``x + N_out(F(N_in(x)))``                              A + B
    sandwich      same as peri (the model adds scaled init)              A + B
    normformer    attn: ``x + N_out(HeadScale-MHA(N_in(x)))``;            A, B on attention only,
                  FFN: ``x + fc2(N_inner(act(fc1 N_in(x))))``            FFN inner norm, head scale;
                  (``λ ⊙ x + ...`` with ``resid_scale``)                 optional ResScale λ
    post          ``N_out(x + F(x))``                                    C
    deepnorm      ``N_out(α x + F(x))``                                  C, ``resid_alpha`` = α
    ============  =====================================================  ==============================

    The slot attributes are ``attn_in_norm``, ``attn_out_norm``, ``mlp_in_norm``, ``mlp_out_norm`` (``None``
    where the placement has no such norm). ``*_out_norm`` is position B or C depending on the placement; read
    ``out_norm_position`` (``"branch"``, ``"after_add"`` or ``None``) rather than the name: the same module name
    means different positions in different code bases (HF LLaMA's ``post_attention_layernorm`` is a pre-FFN norm,
    Gemma 2's a branch-output norm). Dropout acts on the branch output after any B norm, before the add.

    Attributes:
        placement: the effective placement of this block (Mix-LN blocks are ``"post"`` or ``"pre"``).
        layer_idx: 1-based block index ℓ.
        resid_alpha: multiplier of the skip path (DeepNorm α, else 1).
        branch_scale: constant multiplying the input-norm outputs (LNS ``1/sqrt(ℓ)``, else 1).
        out_norm_position: where ``attn_out_norm``/``mlp_out_norm`` sit.
        resid_scale: NormFormer's ResScale λ, a ``(d_model,)`` parameter on the FFN skip path (``config.resid_scale``),
            else ``None``.

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
        spec = PLACEMENT_SPECS.get(placement)
        if spec is None or not spec.is_block_placement:
            names = tuple(name for name, s in PLACEMENT_SPECS.items() if s.is_block_placement)
            raise ValueError(f"Block: expected placement in {names}, got {placement!r}")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 1:
            raise ValueError(f"Block: expected a 1-based layer_idx >= 1, got {layer_idx!r}")
        self.placement = placement
        self.layer_idx = layer_idx
        self.resid_alpha = spec.resid_alpha(layer_idx, config.n_layers, arch)
        self.branch_scale = spec.branch_scale(layer_idx, config.n_layers, arch)
        self.out_norm_position: str | None = spec.out_norm_position

        def norm(slot: str, width: int = config.d_model) -> nn.Module | None:
            return build_slot_norm(config, slot, width, dyt_alpha=dyt_alpha) if slot in spec.slots else None

        # Registered in forward order: attn_in, attn_out, mlp_in, mlp_out (then the FFN's inner norm).
        self.attn_in_norm = norm("attn_in")
        self.attn_out_norm = norm("attn_out")
        self.mlp_in_norm = norm("mlp_in")
        self.mlp_out_norm = norm("mlp_out")
        self.attn = Attention(config, n_tokens=n_tokens, head_scale=spec.head_scale)
        self.mlp = MLP(config, inner_norm=norm("mlp_inner", config.d_ffn))
        self.drop = nn.Dropout(config.dropout)
        # NormFormer's ResScale λ (per dimension, init 1) on the FFN skip path.
        use_resid_scale = config.resid_scale and "resid_scale" in spec.options
        self.resid_scale = nn.Parameter(torch.ones(config.d_model)) if use_resid_scale else None

    def forward(
        self, x: Tensor, mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        """``x``: ``(B, N, d_model)``; ``mask``: ``(B, N)`` bool valid tokens, passed to batch-statistic norms;
        ``attn_mask``/``is_causal``: as :meth:`Attention.forward`."""

        def attn(h: Tensor) -> Tensor:
            return self.attn(h, mask, attn_mask, is_causal)

        def mlp(h: Tensor) -> Tensor:
            return self.mlp(h, mask)

        x = self._sublayer(x, attn, self.attn_in_norm, self.attn_out_norm, mask)
        x = self._sublayer(x, mlp, self.mlp_in_norm, self.mlp_out_norm, mask, skip_gain=self.resid_scale)
        return x

    def _sublayer(
        self,
        x: Tensor,
        f: Callable[[Tensor], Tensor],
        norm_in: nn.Module | None,
        norm_out: nn.Module | None,
        mask: Tensor | None = None,
        skip_gain: Tensor | None = None,
    ) -> Tensor:
        """One residual sublayer, ``x ← N_C(α·λ⊙x + Drop(N_B(F(s · N_A(x)))))``.

        ``N_A`` is ``norm_in``; ``norm_out`` is ``N_B`` or ``N_C`` as ``out_norm_position`` says; a missing norm is
        the identity; α = ``resid_alpha``, s = ``branch_scale``, λ = ``skip_gain`` (ResScale; 1 when ``None``).
        """
        n_b, n_c = (norm_out, None) if self.out_norm_position == "branch" else (None, norm_out)
        y = apply_norm(n_b, f(_scaled(apply_norm(norm_in, x, mask), self.branch_scale)), mask)
        skip = _scaled(x, self.resid_alpha)
        if skip_gain is not None:
            skip = skip * skip_gain.to(skip.dtype)
        return apply_norm(n_c, skip + self.drop(y), mask)

    def extra_repr(self) -> str:
        return (
            f"placement={self.placement!r}, layer_idx={self.layer_idx}, resid_alpha={self.resid_alpha:.4g}, "
            f"branch_scale={self.branch_scale:.4g}"
        )
