"""Configuration of the reference Transformers (:class:`TransformerConfig`).

Which placements exist, and the slots each builds, come from the placement table
(:mod:`normlab.models.placement`, where the papers are listed); QK-norm from Henry et al. 2020
(https://arxiv.org/abs/2010.04245) and σReparam from Zhai et al. 2023 (https://arxiv.org/abs/2303.06296).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
class TransformerConfig:
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
        mix_alpha: Mix-LN fraction α: the first ``floor(α L)`` blocks are Post-LN.
        dropout: dropout on embeddings, attention probabilities and branch outputs.
        bias: biases in the block's linear layers.
        vocab_size, max_seq_len, causal: decoder settings.
        image_size, patch_size, in_channels, num_classes: ViT settings.
        init_std: std of the N(0, init_std) init of linear and embedding weights (position embeddings: half).
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
    mix_alpha: float = 0.25
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

    def __post_init__(self) -> None:
        for name in (
            "d_model",
            "n_layers",
            "n_heads",
            "vocab_size",
            "max_seq_len",
            "image_size",
            "patch_size",
            "in_channels",
            "num_classes",
        ):
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
        for name in ("qk_norm_per_head", "final_norm", "sigma_reparam", "causal", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TransformerConfig: expected {name} to be a bool, got {getattr(self, name)!r}")
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
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"TransformerConfig: expected {name} to be a positive number, got {v!r}")
        if self.d_ffn < 1:
            raise ValueError(f"TransformerConfig: mlp_ratio={self.mlp_ratio} gives an FFN width of {self.d_ffn}")
        _check_norm_choice("norm", self.norm)
        if not isinstance(self.norm_kwargs, Mapping):
            raise TypeError(
                f"TransformerConfig: expected norm_kwargs to be a dict, got {type(self.norm_kwargs).__name__}"
            )
        if not isinstance(self.norm_overrides, Mapping):
            raise TypeError(
                f"TransformerConfig: expected norm_overrides to be a dict, got {type(self.norm_overrides).__name__}"
            )
        for slot, value in self.norm_overrides.items():
            if slot not in NORM_SLOTS:
                raise ValueError(
                    f"TransformerConfig: unknown norm_overrides slot {slot!r}; expected one of {NORM_SLOTS}"
                )
            if value is None:
                continue
            if isinstance(value, Mapping):
                extra = set(value) - {"norm", "kwargs"}
                if extra:
                    raise ValueError(
                        f"TransformerConfig: norm_overrides[{slot!r}] has unknown keys {sorted(extra)}; "
                        "expected 'norm' and/or 'kwargs'"
                    )
                if "norm" in value:
                    _check_norm_choice(f"norm_overrides[{slot!r}]['norm']", value["norm"])
                if not isinstance(value.get("kwargs", {}), Mapping):
                    raise TypeError(f"TransformerConfig: expected norm_overrides[{slot!r}]['kwargs'] to be a dict")
            else:
                _check_norm_choice(f"norm_overrides[{slot!r}]", value)
        unused = [s for s in self.norm_overrides if s not in self.slots_in_use()]
        if unused:
            mix = (
                f" (mix_alpha={self.mix_alpha}: {self.n_post_layers} of {self.n_layers} blocks Post-LN)"
                if PLACEMENT_SPECS[self.placement].mixes is not None
                else ""
            )
            raise ValueError(
                f"TransformerConfig: norm_overrides for slot(s) {unused} that placement={self.placement!r}{mix}, "
                f"qk_norm={self.qk_norm!r}, final_norm={self.final_norm} does not have; slots in use: "
                f"{self.slots_in_use()}"
            )

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
        """Mix-LN: the number ``floor(mix_alpha * n_layers)`` of leading Post-LN blocks (0 for other placements)."""
        if PLACEMENT_SPECS[self.placement].mixes is None:
            return 0
        return math.floor(self.mix_alpha * self.n_layers)

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

    def to_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict(self)`` (JSON-serialisable when every norm choice is a string)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransformerConfig:
        """Build a config from a dict (e.g. loaded from JSON); unknown keys raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise TypeError(f"TransformerConfig.from_dict: expected a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TransformerConfig.from_dict: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(data))
