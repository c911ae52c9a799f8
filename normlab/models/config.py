"""Configuration of the reference Transformers (:class:`TransformerConfig`).

Which placements exist, and the slots each builds, come from the placement table
(:mod:`normlab.models.placement`, where the papers are listed); QK-norm from Henry et al. 2020
(https://arxiv.org/abs/2010.04245) and σReparam from Zhai et al. 2023 (https://arxiv.org/abs/2303.06296).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from normlab.models._common import DictConfig
from normlab.models.placement import NORM_SLOTS, PLACEMENT_SPECS, block_placements, deepnorm_coefficients
from normlab.registry import get_norm

__all__ = [
    "MLP_KINDS",
    "NORM_SLOTS",
    "PLACEMENTS",
    "QK_NORMS",
    "TransformerConfig",
    "deepnorm_coefficients",
]

# The built-in placements, in the order of the placement table.
PLACEMENTS = tuple(PLACEMENT_SPECS)
QK_NORMS = ("none", "l2", "rms", "layer")
MLP_KINDS = ("gelu", "swiglu")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TransformerConfig: expected {name} to be an int >= 1, got {value!r}")


_POSITIVE_INTS = (
    "d_model",
    "n_layers",
    "n_heads",
    "vocab_size",
    "max_seq_len",
    "image_size",
    "patch_size",
    "in_channels",
    "num_classes",
)
# Config options that only the placement rows listing them in ``PlacementSpec.options`` accept, with their off value.
_PLACEMENT_OPTIONS: dict[str, Any] = {"mix_post_layers": None, "resid_scale": False}
_MIX_ALPHA_DEFAULT = 0.25


def _positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_slot_value(name: str, value: Any, *, norm_required: bool) -> None:
    """A slot's value: ``None``, a norm choice, or ``{"norm": choice, "kwargs": {...}}`` (``norm`` optional in
    ``norm_overrides``, where it keeps the slot's default norm)."""
    if value is None:
        return
    if not isinstance(value, Mapping):
        _check_norm_choice(name, value)
        return
    extra = set(value) - {"norm", "kwargs"}
    if extra:
        raise ValueError(f"TransformerConfig: {name} has unknown keys {sorted(extra)}; expected 'norm' and/or 'kwargs'")
    if "norm" in value:
        _check_norm_choice(f"{name}['norm']", value["norm"])
    elif norm_required:
        raise ValueError(f"TransformerConfig: expected {name} to name a norm ('norm' key), got {dict(value)!r}")
    if not isinstance(value.get("kwargs", {}), Mapping):
        raise TypeError(f"TransformerConfig: expected {name}['kwargs'] to be a dict")


def _check_norm_choice(name: str, value: Any) -> None:
    """A norm choice is a registry key (unknown keys raise the registry's KeyError now), a class or a partial."""
    if isinstance(value, str):
        get_norm(value)
    elif not callable(value):
        raise TypeError(
            f"TransformerConfig: expected {name} to be a registry key, a norm class or a partial, "
            f"got {type(value).__name__}"
        )


@dataclass
class TransformerConfig(DictConfig):
    """Configuration of :class:`~normlab.models.DecoderLM` and :class:`~normlab.models.ViTEncoder`.

    Every field is validated in ``__post_init__``; invalid values raise ``ValueError``/``TypeError`` and an unknown
    norm key raises the registry's ``KeyError``. With ``norm`` given as a string, ``dataclasses.asdict(config)`` is
    JSON-serialisable and :meth:`from_dict` rebuilds the config (unknown keys are errors).

    Args:
        d_model: width of the residual stream.
        n_layers: number of blocks ``L``.
        n_heads: attention heads; must divide ``d_model``.
        mlp: ``"gelu"`` (``fc1 -> GELU -> fc2``) or ``"swiglu"`` (``down(silu(gate(x)) * up(x))``).
        mlp_ratio: FFN hidden width is ``round(mlp_ratio * d_model)`` for both kinds (for LLaMA's 8/3 pass
            ``mlp_ratio=8/3``).
        norm: the norm of every slot: a registry key, a class or a partial; built as
            ``create_norm(norm, d, channel_dim=-1, **norm_kwargs)``.
        norm_kwargs: keyword arguments for ``norm``.
        norm_overrides: per-slot overrides, keys in ``attn_in, attn_out, mlp_in, mlp_out, qk, final, mlp_inner``.
            A value is a norm choice (built without ``norm_kwargs``), ``None`` (no norm in that slot), or a dict
            ``{"norm": choice, "kwargs": {...}}``: with ``norm`` the slot gets that norm with exactly ``kwargs``;
            without it the slot keeps its default norm and ``kwargs`` is merged over its default kwargs (e.g.
            ``{"attn_in": {"kwargs": {"alpha_init": 1.0}}}``). A slot the placement does not have is an error.
        placement: a row of the placement table (:data:`~normlab.models.placement.PLACEMENT_SPECS`):
            ``pre | post | peri | mix | lns | deepnorm | sandwich | normformer``.
        qk_norm: ``none | l2 | rms | layer``; ``l2`` is QKNorm (unit q, k per head and a learnable logit scale g,
            init ``log2(T^2 - T)`` with ``T = max_seq_len`` (decoder) or the token count (ViT), replacing
            ``1/sqrt(d_head)``); ``rms``/``layer`` normalise q and k with ``rms_norm``/``layer_norm`` (or the ``qk``
            override) and keep ``1/sqrt(d_head)``.
        qk_norm_per_head: normalise over ``d_head`` per head (Gemma 3) or jointly over ``d_model`` (OLMo 2).
        final_norm: a norm before the head (``model.final_norm``).
        sigma_reparam: σReparam on every linear layer of the blocks.
        mix_alpha: Mix-LN fraction α: the first ``floor(α L)`` blocks are Post-LN. The product is taken in floating
            point, so a fraction meant to give k blocks can give k - 1: α = 15/22 at L = 22 is 14.999999999999998
            blocks, floor 14. Give ``mix_post_layers`` to state the count exactly.
        dropout: dropout on embeddings, attention probabilities and branch outputs.
        bias: biases in the block's linear layers.
        vocab_size, max_seq_len, causal: decoder settings.
        image_size, patch_size, in_channels, num_classes: ViT settings.
        init_std: std of the N(0, init_std) init of linear and embedding weights (position embeddings: half).
        embed_norm: a norm on the embedding output, ``x₁ = N_emb(tokens + positions)`` (BERT's embedding LN; the
            optional Peri-LN embedding norm, OLMo-core's ``embedding_norm``): a norm choice, ``{"norm": choice,
            "kwargs": {...}}`` (built with exactly those kwargs, not ``norm_kwargs``) or ``None`` (default: none).
        embed_scale: a constant multiplying the token embeddings before the position embeddings are added:
            ``"sqrt_d"`` (√d_model, Gemma's normaliser), a positive number (Grok-1's ``embedding_multiplier_scale``)
            or ``None`` (default: unscaled). Decoder only.
        mix_post_layers: Mix-LN by count, as the official code's ``POST_NUM``: the first ``mix_post_layers`` blocks
            are Post-LN. Replaces ``mix_alpha`` (leave that at its default); ``placement="mix"`` only.
        resid_scale: NormFormer's ResScale (Shleifer et al. 2021, §2): a learnable per-dimension λ (init 1) on the
            FFN skip path, ``x ← λ ⊙ x + FFN(...)`` (fairseq's ``--scale-resids`` scales the FFN residual only);
            ``placement="normformer"`` only. Off by default.
    """

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp: str = "gelu"
    mlp_ratio: float = 4.0
    norm: str | type | Callable[..., Any] = "layer_norm"
    norm_kwargs: dict[str, Any] = field(default_factory=dict)
    norm_overrides: dict[str, Any] = field(default_factory=dict)
    placement: str = "pre"
    qk_norm: str = "none"
    qk_norm_per_head: bool = True
    final_norm: bool = True
    sigma_reparam: bool = False
    mix_alpha: float = _MIX_ALPHA_DEFAULT
    dropout: float = 0.0
    bias: bool = True
    vocab_size: int = 256
    max_seq_len: int = 256
    causal: bool = True
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 10
    init_std: float = 0.02
    embed_norm: str | type | Callable[..., Any] | dict[str, Any] | None = None
    embed_scale: str | float | None = None
    mix_post_layers: int | None = None
    resid_scale: bool = False

    def __post_init__(self) -> None:
        self._check_sizes()
        self._check_choices()
        self._check_numbers()
        self._check_norms()
        self._check_placement_options()
        self._check_override_slots()

    def _check_sizes(self) -> None:
        for name in _POSITIVE_INTS:
            _positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"TransformerConfig: expected d_model divisible by n_heads, got d_model={self.d_model}, "
                f"n_heads={self.n_heads}"
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"TransformerConfig: expected image_size divisible by patch_size, got image_size={self.image_size}, "
                f"patch_size={self.patch_size}"
            )

    def _check_choices(self) -> None:
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"TransformerConfig: expected mlp in {MLP_KINDS}, got {self.mlp!r}")
        if self.placement not in PLACEMENT_SPECS:
            raise ValueError(
                f"TransformerConfig: expected placement in {tuple(PLACEMENT_SPECS)}, got {self.placement!r}"
            )
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"TransformerConfig: expected qk_norm in {QK_NORMS}, got {self.qk_norm!r}")
        if self.qk_norm == "l2" and not self.qk_norm_per_head:
            raise ValueError(
                "TransformerConfig: qk_norm='l2' (QKNorm) normalises each head's q and k; expected "
                "qk_norm_per_head=True, got False"
            )
        for name in ("qk_norm_per_head", "final_norm", "sigma_reparam", "causal", "bias", "resid_scale"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TransformerConfig: expected {name} to be a bool, got {getattr(self, name)!r}")

    def _check_numbers(self) -> None:
        for name, lo, hi, hi_open in (("mix_alpha", 0.0, 1.0, False), ("dropout", 0.0, 1.0, True)):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not (lo <= v < hi if hi_open else lo <= v <= hi)
            ):
                rng = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
                raise ValueError(f"TransformerConfig: expected {name} in {rng}, got {v!r}")
        for name in ("mlp_ratio", "init_std"):
            v = getattr(self, name)
            if not _positive_number(v):
                raise ValueError(f"TransformerConfig: expected {name} to be a positive number, got {v!r}")
        if self.d_ffn < 1:
            raise ValueError(f"TransformerConfig: mlp_ratio={self.mlp_ratio} gives an FFN width of {self.d_ffn}")
        if self.embed_scale is not None and self.embed_scale != "sqrt_d" and not _positive_number(self.embed_scale):
            raise ValueError(
                "TransformerConfig: expected embed_scale to be None, 'sqrt_d' or a positive finite number, "
                f"got {self.embed_scale!r}"
            )
        k = self.mix_post_layers
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.n_layers):
            raise ValueError(
                f"TransformerConfig: expected mix_post_layers to be None or an int in [0, n_layers={self.n_layers}], "
                f"got {k!r}"
            )

    def _check_norms(self) -> None:
        _check_norm_choice("norm", self.norm)
        for name in ("norm_kwargs", "norm_overrides"):
            if not isinstance(getattr(self, name), Mapping):
                raise TypeError(
                    f"TransformerConfig: expected {name} to be a dict, got {type(getattr(self, name)).__name__}"
                )
        for slot, value in self.norm_overrides.items():
            if slot not in NORM_SLOTS:
                raise ValueError(
                    f"TransformerConfig: unknown norm_overrides slot {slot!r}; expected one of {NORM_SLOTS}"
                )
            _check_slot_value(f"norm_overrides[{slot!r}]", value, norm_required=False)
        _check_slot_value("embed_norm", self.embed_norm, norm_required=True)

    def _check_placement_options(self) -> None:
        """Options that only some placement rows accept (``PlacementSpec.options``) are errors elsewhere."""
        spec = PLACEMENT_SPECS[self.placement]
        for name, off in _PLACEMENT_OPTIONS.items():
            value = getattr(self, name)
            if value != off and name not in spec.options:
                rows = tuple(n for n, s in PLACEMENT_SPECS.items() if name in s.options)
                raise ValueError(
                    f"TransformerConfig: {name}={value!r} applies to placement in {rows}, got "
                    f"placement={self.placement!r}"
                )
        if self.mix_post_layers is not None and self.mix_alpha != _MIX_ALPHA_DEFAULT:
            raise ValueError(
                "TransformerConfig: expected Mix-LN's Post-LN blocks as mix_alpha or as mix_post_layers, not both; "
                f"got mix_alpha={self.mix_alpha!r} and mix_post_layers={self.mix_post_layers!r}"
            )

    def _check_override_slots(self) -> None:
        unused = [s for s in self.norm_overrides if s not in self.slots_in_use()]
        if unused:
            mix = (
                f" ({self._mix_form()}: {self.n_post_layers} of {self.n_layers} blocks Post-LN)"
                if PLACEMENT_SPECS[self.placement].mixes is not None
                else ""
            )
            raise ValueError(
                f"TransformerConfig: norm_overrides for slot(s) {unused} that placement={self.placement!r}{mix}, "
                f"qk_norm={self.qk_norm!r}, final_norm={self.final_norm} does not have; slots in use: "
                f"{self.slots_in_use()}"
            )

    def _mix_form(self) -> str:
        if self.mix_post_layers is not None:
            return f"mix_post_layers={self.mix_post_layers}"
        return f"mix_alpha={self.mix_alpha}"

    @property
    def d_head(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def d_ffn(self) -> int:
        """FFN hidden width ``round(mlp_ratio * d_model)``."""
        return int(round(self.mlp_ratio * self.d_model))

    @property
    def n_post_layers(self) -> int:
        """Mix-LN: the number of leading Post-LN blocks, ``mix_post_layers`` when given, else
        ``floor(mix_alpha * n_layers)`` (0 for other placements)."""
        if PLACEMENT_SPECS[self.placement].mixes is None:
            return 0
        if self.mix_post_layers is not None:
            return self.mix_post_layers
        return math.floor(self.mix_alpha * self.n_layers)

    @property
    def embed_multiplier(self) -> float | None:
        """``embed_scale`` as a number: √d_model for ``"sqrt_d"``, ``None`` when unset."""
        if self.embed_scale is None:
            return None
        return math.sqrt(self.d_model) if self.embed_scale == "sqrt_d" else float(self.embed_scale)

    def slots_in_use(self) -> tuple[str, ...]:
        """The norm slots this configuration builds (the keys ``norm_overrides`` may name): the slots of every
        block's placement row (Mix-LN: only of the parts some block uses, so mix_alpha = 1 has no Pre-LN slot),
        plus ``qk`` and ``final`` when those options are on."""
        slots = [s for p in set(block_placements(self)) for s in PLACEMENT_SPECS[p].slots]
        if self.qk_norm in ("rms", "layer"):
            slots.append("qk")
        if self.final_norm:
            slots.append("final")
        return tuple(s for s in NORM_SLOTS if s in slots)

