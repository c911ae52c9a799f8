"""Compact decoder-only language model (:class:`DecoderLM`) with every norm placement, and the helpers the ViT shares
(model output, block stack, initialisation rules).

GPT-2 init N(0, 0.02) (Radford et al. 2019) for every placement, then each placement's own init rule from the
placement table (:mod:`normlab.models.placement`: Sandwich-LN's scaled init, DeepNorm's β); σReparam
(https://arxiv.org/abs/2303.06296); DyT α₀ (Zhu et al. 2025, https://arxiv.org/abs/2503.10622).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.models.block import Block
from normlab.models.config import TransformerConfig
from normlab.models.layers import apply_norm, build_slot_norm
from normlab.models.placement import PLACEMENT_SPECS, block_placements
from normlab.nn.sigma_reparam import SigmaReparamLinear
from normlab.registry import create_norm

__all__ = [
    "DYT_ALPHA_DECODER",
    "DYT_ALPHA_ENCODER",
    "DecoderLM",
    "ModelOutput",
    "block_placements",
    "build_blocks",
    "build_embed_norm",
    "init_transformer_weights",
]

# DyT α₀ defaults (Zhu et al. 2025, the LLaMA recipe). Decoder LMs: the LLaMA recipe's smallest listed model (7B) uses
# 0.8 for the attention-input DyT and 0.2 for the FFN-input and final DyT; the rule "wider models need smaller α₀"
# means a small model should not go below these, so we take them as the small-model default. Every slot other than
# attn_in uses the FFN value (a DyT qk norm keeps DyT's own 0.5). Encoders (ViT, non-LLM tasks): 0.5 everywhere.
# An explicit alpha_init in norm_kwargs or a slot override wins.
DYT_ALPHA_DECODER = {"attn_in": 0.8, "attn_out": 0.2, "mlp_in": 0.2, "mlp_out": 0.2, "mlp_inner": 0.2, "final": 0.2}
DYT_ALPHA_ENCODER = dict.fromkeys(DYT_ALPHA_DECODER, 0.5)


@dataclass
class ModelOutput:
    """What :class:`DecoderLM` and :class:`~normlab.models.ViTEncoder` return.

    Attributes:
        logits: ``(B, N, vocab_size)`` (decoder) or ``(B, num_classes)`` (ViT).
        loss: mean cross-entropy when labels are given, else ``None``.
        hidden_states: with ``output_hidden_states=True``: the embedding output and each block's output
            (``n_layers + 1`` tensors of shape ``(B, N, d_model)``), before the final norm.
    """

    logits: Tensor
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


def build_blocks(config: TransformerConfig, *, n_tokens: int, arch: str) -> nn.ModuleList:
    """The block stack, with 1-based ``layer_idx`` and the effective placement per block."""
    dyt_alpha = DYT_ALPHA_DECODER if arch == "decoder" else DYT_ALPHA_ENCODER
    return nn.ModuleList(
        Block(config, i + 1, p, n_tokens=n_tokens, arch=arch, dyt_alpha=dyt_alpha)
        for i, p in enumerate(block_placements(config))
    )


def build_embed_norm(config: TransformerConfig) -> nn.Module | None:
    """The norm on the embedding output (``config.embed_norm``), or ``None``."""
    value = config.embed_norm
    if value is None:
        return None
    choice, kwargs = (value["norm"], dict(value.get("kwargs", {}))) if isinstance(value, Mapping) else (value, {})
    kwargs.setdefault("channel_dim", -1)
    return create_norm(choice, config.d_model, **kwargs)


def _linear_like(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, SigmaReparamLinear))


@torch.no_grad()
def init_transformer_weights(model: nn.Module, config: TransformerConfig, *, arch: str) -> None:
    """Initialise linear, embedding and block weights: the GPT-2 init, then each block's placement rule.

    - Every linear (and conv patch embedding) weight and every embedding: N(0, ``init_std``); biases 0;
      ``pos_embed`` N(0, ``init_std / 2``) (GPT-2's 0.01 for 0.02). Norms keep their own ``reset_parameters``.
    - Then, block by block, the ``init`` rule of the block's placement row (``PlacementSpec.init``):
      ``sandwich``: ``out_proj`` and ``fc2``/``down_proj`` get N(0, ``init_std / sqrt(2L)``) (CogView);
      ``deepnorm``: Xavier-normal with gain β = (8L)^{-1/4} on ``v_proj``, ``out_proj`` and the FFN weights, gain 1
      on ``q_proj``, ``k_proj`` (the paper's pseudocode; torchscale instead divides its default init by 1/β).
    - ``sigma_reparam``: after all of that, each σReparam linear recomputes ``u``, σ and γ from its new weight.
    """
    for m in model.modules():
        if _linear_like(m) or isinstance(m, (nn.Conv2d, nn.Embedding)):
            nn.init.normal_(_param(m, "weight"), std=config.init_std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(_param(m, "bias"))
    pos_embed = getattr(model, "pos_embed", None)
    if isinstance(pos_embed, nn.Parameter):
        nn.init.normal_(pos_embed, std=config.init_std / 2)
    for block in cast(nn.ModuleList, model.blocks):
        rule = PLACEMENT_SPECS[cast(Block, block).placement].init
        if rule is not None:
            rule(block, config, arch)
    for m in model.modules():
        if isinstance(m, SigmaReparamLinear):
            m.reset_sigma()


def _param(module: nn.Module, name: str) -> Tensor:
    return cast(Tensor, getattr(module, name))


def causal_padding_mask(attention_mask: Tensor, causal: bool) -> Tensor:
    """Boolean SDPA mask ``(B, 1, N, N)``: key valid (and key ≤ query when causal). Every query may attend to itself,
    so the rows of padded queries are never all-masked (their outputs are ignored downstream)."""
    b, n = attention_mask.shape
    valid = attention_mask.bool()
    allowed = valid[:, None, None, :].expand(b, 1, n, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    return allowed | torch.eye(n, dtype=torch.bool, device=valid.device)


class DecoderLM(nn.Module):
    r"""Decoder-only language model: token + learned position embeddings, ``n_layers`` :class:`Block`\ s with the
    configured placement, an optional final norm and a linear LM head (not tied).

    Module names (the contract diagnostics, surgery and the lab use): ``embed``, ``pos_embed`` (a parameter of shape
    ``(1, max_seq_len, d_model)``), ``embed_norm`` (or ``None``), ``blocks``, ``final_norm`` (or ``None``),
    ``lm_head``.

    The embedding output (``hidden_states[0]``) is ``x₁ = N_emb(c · embed(ids) + pos_embed)``, with ``c`` =
    ``config.embed_scale`` (Gemma's √d; default none) and ``N_emb`` = ``config.embed_norm`` (default none). Without
    them the embedding has std 0.02 while every Peri-LN branch adds a unit-variance vector, so the token itself is a
    small part of the first block's output; Gemma scales it, OLMo-core's Peri-LN ladder offers an embedding norm.

    DyT α₀ (when a slot's norm is ``dyt`` and no ``alpha_init`` is given; :data:`DYT_ALPHA_DECODER`). The DyT
    paper's LLaMA recipe (Zhu et al. 2025, https://arxiv.org/abs/2503.10622) sets one α₀ for the attention-input DyT
    and a smaller one for the FFN-input and final DyT; we use its smallest listed model's values (7B: 0.8 and 0.2),
    since wider models need smaller α₀ and ours are narrow. The recipe only has Pre-LN slots, so the rest is our
    choice, made by slot, not by what the norm's output feeds:

    ================================  =======================================  ===================
    slot                              placements that have it                  α₀
    ================================  =======================================  ===================
    ``attn_in`` (A, attention input)  pre, lns, peri, sandwich, normformer,    0.8
                                      Mix-LN's Pre-LN blocks
    ``mlp_in`` (A, FFN input)         the same                                 0.2
    ``attn_out`` / ``mlp_out``        B: peri, sandwich, normformer (attn);    0.2
                                      C: post, deepnorm, Mix-LN's Post-LN
                                      blocks
    ``mlp_inner``                     normformer                               0.2
    ``final``                         all, with ``final_norm=True``            0.2
    ``qk``                            ``qk_norm`` rms/layer, ``qk`` override   0.5 (DyT's default)
                                      set to ``dyt``
    ================================  =======================================  ===================

    So a Post-LN or DeepNorm decoder starts every DyT at 0.2, even though its after-add norm after the FFN feeds
    the next block's attention. The paper gives no value for Post-LN placements (the recipe is for Pre-LN LLaMA); to
    use 0.8 there pass ``norm_overrides={"mlp_out": {"kwargs": {"alpha_init": 0.8}}}``. The recipe's
    other LLaMA changes (no β, a learnable √d multiplier after the token embedding) are not applied: ``dyt`` keeps
    its β and the embedding is unscaled. :class:`~normlab.models.ViTEncoder` uses 0.5 in every slot
    (:data:`DYT_ALPHA_ENCODER`, the recipe for non-LLM tasks).

    Args:
        config: a :class:`TransformerConfig`.

    Example:
        >>> model = DecoderLM(TransformerConfig(d_model=32, n_layers=2, n_heads=2, placement="peri"))
        >>> ids = torch.randint(0, 256, (2, 10))
        >>> out = model(ids, labels=ids)
        >>> out.logits.shape, out.loss.shape
        (torch.Size([2, 10, 256]), torch.Size([]))
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"DecoderLM: expected a TransformerConfig, got {type(config).__name__}")
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.max_seq_len, d))
        self.embed_scale = config.embed_multiplier
        self.embed_norm = build_embed_norm(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = build_blocks(config, n_tokens=config.max_seq_len, arch="decoder")
        self.final_norm = (
            build_slot_norm(config, "final", d, dyt_alpha=DYT_ALPHA_DECODER) if config.final_norm else None
        )
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        init_transformer_weights(self, config, arch="decoder")

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise TypeError(f"DecoderLM: expected input_ids to be an integer (long) tensor, got {got}")
        if input_ids.dim() != 2:
            raise ValueError(f"DecoderLM: expected input_ids of shape [B, N], got size {list(input_ids.shape)}")
        n = input_ids.shape[1]
        if n > self.config.max_seq_len:
            raise ValueError(f"DecoderLM: sequence length {n} exceeds max_seq_len={self.config.max_seq_len}")
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and (not isinstance(t, Tensor) or t.shape != input_ids.shape):
                shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"DecoderLM: expected {name} of size {list(input_ids.shape)}, got {shape}")

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Logits for every position; with ``labels`` the next-token cross-entropy.

        Args:
            input_ids: ``(B, N)`` token ids.
            attention_mask: ``(B, N)``, 1/``True`` = real token, 0 = padding. Padded keys are not attended to, and
                batch-statistic norms get it as ``mask``.
            labels: ``(B, N)``; shifted inside (position ``t`` predicts ``labels[:, t + 1]``); a pair is ignored when
                the target is -100 or either position ``t`` or ``t + 1`` is padding.
            output_hidden_states: also return the ``n_layers + 1`` residual-stream tensors.
        """
        self._check_inputs(input_ids, attention_mask, labels)
        n = input_ids.shape[1]
        mask = attention_mask.bool() if attention_mask is not None else None
        attn_mask = causal_padding_mask(attention_mask, self.config.causal) if attention_mask is not None else None
        tokens = self.embed(input_ids)
        if self.embed_scale is not None:
            tokens = tokens * self.embed_scale
        x = self.drop(apply_norm(self.embed_norm, tokens + self.pos_embed[:, :n], mask))
        hidden: list[Tensor] = [x]
        for block in self.blocks:
            x = block(x, mask, attn_mask, self.config.causal)
            hidden.append(x)
        logits = self.lm_head(apply_norm(self.final_norm, x, mask))
        loss = None
        if labels is not None:
            targets = labels[:, 1:].long()
            if mask is not None:
                # A pair counts only when both the predicting position and the target are real tokens; a padded
                # input position (e.g. the last left pad predicting the first token) has a meaningless prediction.
                targets = targets.masked_fill(~(mask[:, 1:] & mask[:, :-1]), -100)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, hidden_states=tuple(hidden) if output_hidden_states else None)
