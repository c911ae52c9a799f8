"""The placement table: one :class:`PlacementSpec` row per norm placement of the reference Transformers.

Everything that differs between placements is a field of its row: which norm slots a block has, where the
``*_out`` norm sits (on the branch output, position B, or after the residual add, position C), the residual
multiplier α and the constant branch scale as functions of the block index, the weight-init rule, NormFormer's
head scale, Mix-LN's split into Post-LN and Pre-LN blocks, and the papers. Config validation
(:class:`~normlab.models.TransformerConfig`), :class:`~normlab.models.Block`, the model init
(:func:`~normlab.models.transformer.init_transformer_weights`) and the tests read the table; nothing else branches
on a placement's name.

Every block computes, per sublayer ``F`` (attention, then FFN; absent norms are the identity)::

    x ← N_C(α·x + N_B(F(s · N_A(x))))

Papers: Post-LN (Vaswani et al. 2017, https://arxiv.org/abs/1706.03762), Pre-LN (Xiong et al. 2020,
https://arxiv.org/abs/2002.04745), Peri-LN (Kim et al. 2025, https://arxiv.org/abs/2502.02732), Sandwich-LN
(CogView, Ding et al. 2021, https://arxiv.org/abs/2105.13290), Mix-LN (Li et al. 2024,
https://arxiv.org/abs/2412.13795), LayerNorm Scaling (Sun et al. 2025, https://arxiv.org/abs/2502.05795), DeepNorm
(Wang et al. 2022, https://arxiv.org/abs/2203.00555), NormFormer (Shleifer et al. 2021,
https://arxiv.org/abs/2110.09456).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from normlab.models.config import TransformerConfig

__all__ = [
    "BLOCK_SLOTS",
    "NORM_SLOTS",
    "OUT_NORM_POSITIONS",
    "PLACEMENT_SPECS",
    "PlacementSpec",
    "block_placements",
    "deepnorm_coefficients",
    "get_placement",
]

# Every norm slot of the models. "mlp_inner" is NormFormer's norm on the FFN hidden (d_ffn wide); the others are
# d_model wide. "qk" and "final" are model options (qk_norm, final_norm), the rest belong to a placement.
NORM_SLOTS = ("attn_in", "attn_out", "mlp_in", "mlp_out", "qk", "final", "mlp_inner")
BLOCK_SLOTS = ("attn_in", "attn_out", "mlp_in", "mlp_out", "mlp_inner")
# Where a block's attn_out / mlp_out norms sit: on the branch output before the add (B) or after the add (C).
OUT_NORM_POSITIONS = ("branch", "after_add")

# A per-block constant: (layer_idx ℓ, 1-based; number of blocks L; "decoder" or "encoder") -> value.
BlockRule = Callable[[int, int, str], float]
# A weight-init rule, applied to each block after the GPT-2 init of the whole model: (block, config, arch) -> None.
InitRule = Callable[[nn.Module, "TransformerConfig", str], None]


def deepnorm_coefficients(n_layers: int, arch: str = "decoder") -> tuple[float, float]:
    """DeepNorm's residual multiplier α and init gain β for ``n_layers`` blocks.

    Wang et al. 2022 (https://arxiv.org/abs/2203.00555): encoder-only with N blocks and decoder-only with
    M blocks both use ``α = (2L)^{1/4}``, ``β = (8L)^{-1/4}``.

    Args:
        n_layers: number of blocks ``L`` (not sublayers).
        arch: ``"decoder"`` (decoder-only) or ``"encoder"`` (encoder-only).

    Returns:
        ``(alpha, beta)``.

    >>> [round(c, 3) for c in deepnorm_coefficients(12)]
    [2.213, 0.32]
    """
    if arch not in ("decoder", "encoder"):
        raise ValueError(f"deepnorm_coefficients: expected arch 'decoder' or 'encoder', got {arch!r}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"deepnorm_coefficients: expected n_layers to be an int >= 1, got {n_layers!r}")
    return (2.0 * n_layers) ** 0.25, (8.0 * n_layers) ** -0.25


# ----------------------------------------------------------------------------------------------------------------------
# Rules the rows refer to.


def one(layer_idx: int, n_layers: int, arch: str) -> float:
    """The neutral constant 1 (no residual up-weighting, no branch scaling)."""
    return 1.0


def deepnorm_alpha(layer_idx: int, n_layers: int, arch: str) -> float:
    """DeepNorm's α = (2L)^{1/4} (Wang et al. 2022), the same for every block."""
    return deepnorm_coefficients(n_layers, arch)[0]


def lns_scale(layer_idx: int, n_layers: int, arch: str) -> float:
    """LayerNorm Scaling's 1/√ℓ with a 1-based ℓ, so the first block is unscaled (Sun et al. 2025)."""
    return 1.0 / math.sqrt(layer_idx)


def _weight(module: nn.Module) -> Tensor:
    return cast(Tensor, module.weight)


def _children(owner: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    """The submodules of ``owner`` among ``names`` that exist, in the order of ``names``."""
    return [cast(nn.Module, getattr(owner, n)) for n in names if hasattr(owner, n)]


def _output_projections(block: nn.Module) -> list[nn.Module]:
    """The linear layers that write a block's branch outputs: ``out_proj`` and ``fc2`` / ``down_proj``."""
    attn, mlp = cast(nn.Module, block.attn), cast(nn.Module, block.mlp)
    return _children(attn, ("out_proj",)) + _children(mlp, ("fc2", "down_proj"))


@torch.no_grad()
def scaled_output_init(block: nn.Module, config: TransformerConfig, arch: str) -> None:
    """CogView's scaled init: the output projections get N(0, ``init_std``/√(2L)) (Ding et al. 2021), the GPT-2 /
    Megatron rule for layers that write the residual stream."""
    for lin in _output_projections(block):
        nn.init.normal_(_weight(lin), std=config.init_std / math.sqrt(2 * config.n_layers))


@torch.no_grad()
def deepnorm_init(block: nn.Module, config: TransformerConfig, arch: str) -> None:
    """DeepNorm's init (Wang et al. 2022, the paper's pseudocode): Xavier-normal with gain β = (8L)^{-1/4} on
    ``v_proj``, ``out_proj`` and the FFN weights, gain 1 on ``q_proj`` and ``k_proj``. torchscale instead divides its
    default init by 1/β; we follow the paper."""
    attn, mlp = cast(nn.Module, block.attn), cast(nn.Module, block.mlp)
    beta = deepnorm_coefficients(config.n_layers, arch)[1]
    for lin in _children(attn, ("q_proj", "k_proj")):
        nn.init.xavier_normal_(_weight(lin), gain=1.0)
    ffn = _children(mlp, ("fc1", "fc2", "gate_proj", "up_proj", "down_proj"))
    for lin in _children(attn, ("v_proj", "out_proj")) + ffn:
        nn.init.xavier_normal_(_weight(lin), gain=beta)


# ----------------------------------------------------------------------------------------------------------------------
# The table.


@dataclass(frozen=True)
class PlacementSpec:
    """One row of the placement table.

    Attributes:
        name: the ``placement=`` key.
        equation: the update per sublayer ``F``, as the README's placement table writes it.
        slots: the block norm slots (of :data:`BLOCK_SLOTS`) a block of this placement builds.
        out_norm_position: where ``attn_out`` / ``mlp_out`` sit: ``"branch"`` (B, on ``F``'s output before the add)
            or ``"after_add"`` (C, on the stream after the add); ``None`` when the row has neither slot.
        resid_alpha: α of block ℓ, the multiplier of the skip path.
        branch_scale: s of block ℓ, the constant multiplying the input-norm (A) outputs.
        init: a weight-init rule applied to each block after the model's GPT-2 init, or ``None``.
        head_scale: NormFormer's learnable per-head scale of the attention context.
        mixes: a model-level placement whose blocks use two other rows: ``(first, rest)``, the first
            ``config.n_post_layers`` blocks use ``first`` and the others ``rest`` (Mix-LN). Such a row has no
            block fields of its own.
        options: the :class:`~normlab.models.TransformerConfig` options only this placement accepts
            (``mix_post_layers``, ``resid_scale``); set with another placement they are an error.
        used_by: models and code bases that use the placement.
        papers: arXiv links.
    """

    name: str
    equation: str
    slots: tuple[str, ...] = ()
    out_norm_position: str | None = None
    resid_alpha: BlockRule = one
    branch_scale: BlockRule = one
    init: InitRule | None = None
    head_scale: bool = False
    mixes: tuple[str, str] | None = None
    options: tuple[str, ...] = ()
    used_by: str = ""
    papers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [s for s in self.slots if s not in BLOCK_SLOTS]
        if unknown:
            raise ValueError(f"PlacementSpec {self.name!r}: unknown slots {unknown}; expected slots of {BLOCK_SLOTS}")
        has_out = any(s in self.slots for s in ("attn_out", "mlp_out"))
        if self.out_norm_position not in (*OUT_NORM_POSITIONS, None) or has_out != (self.out_norm_position is not None):
            raise ValueError(
                f"PlacementSpec {self.name!r}: expected out_norm_position in {OUT_NORM_POSITIONS} exactly when the "
                f"row has an attn_out or mlp_out slot, got {self.out_norm_position!r} with slots {self.slots}"
            )
        if self.mixes is not None and (self.slots or self.init is not None or self.head_scale):
            raise ValueError(f"PlacementSpec {self.name!r}: a row that mixes {self.mixes} has no block fields")

    @property
    def is_block_placement(self) -> bool:
        """Whether a :class:`~normlab.models.Block` can have this placement (every row except Mix-LN's)."""
        return self.mixes is None


_A = ("attn_in", "mlp_in")  # position A on both sublayers
_BC = ("attn_out", "mlp_out")  # position B or C on both sublayers

# Rows in the order of ``PLACEMENTS``; Mix-LN's parts must be rows of their own.
PLACEMENT_SPECS: dict[str, PlacementSpec] = {
    s.name: s
    for s in (
        PlacementSpec(
            "pre",
            "x ← x + F(N(x)), final norm",
            slots=_A,
            used_by="GPT-2, LLaMA",
            papers=("https://arxiv.org/abs/2002.04745",),
        ),
        PlacementSpec(
            "post",
            "x ← N(x + F(x))",
            slots=_BC,
            out_norm_position="after_add",
            used_by="original Transformer, BERT",
            papers=("https://arxiv.org/abs/1706.03762",),
        ),
        PlacementSpec(
            "peri",
            "x ← x + N_out(F(N_in(x)))",
            slots=_A + _BC,
            out_norm_position="branch",
            used_by="Gemma 2/3, Grok-1, OLMo-core",
            papers=("https://arxiv.org/abs/2502.02732",),
        ),
        PlacementSpec(
            "mix",
            "first ⌊αL⌋ blocks `post`, the rest `pre` (α = 0.25)",
            mixes=("post", "pre"),
            options=("mix_post_layers",),
            used_by="Mix-LN",
            papers=("https://arxiv.org/abs/2412.13795",),
        ),
        PlacementSpec(
            "lns",
            "x ← x + F(N(x)/√ℓ), ℓ = 1..L; final norm unscaled",
            slots=_A,
            branch_scale=lns_scale,
            used_by="LayerNorm Scaling, OLMo-core",
            papers=("https://arxiv.org/abs/2502.05795",),
        ),
        PlacementSpec(
            "deepnorm",
            "x ← N(αx + F(x)), α = (2L)^¼; v/out/FFN init × β = (8L)^-¼",
            slots=_BC,
            out_norm_position="after_add",
            resid_alpha=deepnorm_alpha,
            init=deepnorm_init,
            used_by="DeepNet",
            papers=("https://arxiv.org/abs/2203.00555",),
        ),
        PlacementSpec(
            "sandwich",
            "as `peri`, plus out-projection init 0.02/√(2L)",
            slots=_A + _BC,
            out_norm_position="branch",
            init=scaled_output_init,
            used_by="CogView",
            papers=("https://arxiv.org/abs/2105.13290",),
        ),
        PlacementSpec(
            "normformer",
            "`pre` + norm on the attention output, per-head scale, norm after the FFN activation",
            slots=("attn_in", "attn_out", "mlp_in", "mlp_inner"),
            out_norm_position="branch",
            head_scale=True,
            options=("resid_scale",),
            used_by="NormFormer, open_clip",
            papers=("https://arxiv.org/abs/2110.09456",),
        ),
    )
}


def get_placement(name: str) -> PlacementSpec:
    """The row of ``name``; an unknown name raises ``ValueError`` listing the placements."""
    spec = PLACEMENT_SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"expected placement in {tuple(PLACEMENT_SPECS)}, got {name!r}")
    return spec


def block_placements(config: TransformerConfig) -> list[str]:
    """The effective placement of each block: a row that ``mixes`` two placements (Mix-LN) gives its first
    ``config.n_post_layers`` blocks the first and the rest the second; every other placement is the same for all
    blocks."""
    spec = get_placement(config.placement)
    if spec.mixes is None:
        return [config.placement] * config.n_layers
    first, rest = spec.mixes
    k = config.n_post_layers
    return [first if i < k else rest for i in range(config.n_layers)]
