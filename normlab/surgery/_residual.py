"""Residual-stream maps of Pre-LN Transformer families, layer access across weight layouts, and the report of the
exact LayerNorm surgeries (:mod:`normlab.surgery.ln_fold`, :mod:`normlab.surgery.convert`).

All model-structure knowledge of those surgeries lives in :data:`STREAM_MAPS`: per family, which modules write the
residual stream (token / position embeddings, attention out-projection, FFN down-projection) and which read it
(the LayerNorm in front of each sublayer, the layers behind that norm, the final norm and the head). Supporting another
Pre-LN family (LLaMA-style models once their RMSNorm is recognised, ...) is one more entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "STREAM_MAPS",
    "BlockSites",
    "Stream",
    "StreamChange",
    "StreamMap",
    "StreamSurgeryReport",
    "resolve_stream",
]

# Hugging Face model types whose blocks are Post-LN (the LayerNorm normalises the stream itself after each add).
POST_LN_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert", "mpnet", "xlm", "ernie"}
)


@dataclass(frozen=True)
class StreamMap:
    """Where one family's residual stream is written and read. Paths are relative to ``base`` (the head's to the
    model); a tuple lists alternatives, of which the ones present in a block are used (GELU ``fc1`` or SwiGLU
    ``gate_proj`` + ``up_proj``).

    Attributes:
        family: a short name for reports.
        matches: whether a model belongs to the family.
        refuse: a reason the model cannot be treated (Post-LN, unsupported options), or ``None``.
        base: path of the module owning embeddings, blocks and the final norm (``""`` = the model).
        token_embedding / position_embedding: stream writers that are tables (``nn.Embedding`` or a parameter).
        blocks: the block ``ModuleList``.
        attn_norm / mlp_norm: the LayerNorm in front of each sublayer.
        attn_readers / mlp_readers: the linear layers reading that norm's output.
        value: ``(path, chunk, chunks)``: the value projection is output chunk ``chunk`` of ``chunks`` of this layer.
        attn_writer / mlp_writer: the layers adding into the stream.
        final_norm / head: the last norm and the layer reading it (relative to the model), or ``None``.
        stream_dropout: dropout modules acting on stream writes (``"block."`` prefix: inside each block).
        attn_width_from_input: the attention reshapes its context to its input's width (so a d−1 stream needs its
            attention input padded back to d; see :func:`~normlab.surgery.convert_to_crms_norm`).
    """

    family: str
    matches: Callable[[nn.Module], bool]
    refuse: Callable[[nn.Module], str | None]
    base: str
    token_embedding: str
    position_embedding: str | None
    blocks: str
    attn_norm: str
    attn_readers: tuple[str, ...]
    value: tuple[str, int, int]
    attn_writer: tuple[str, ...]
    mlp_norm: str
    mlp_readers: tuple[str, ...]
    mlp_writer: tuple[str, ...]
    final_norm: str | None
    head: str | None
    stream_dropout: tuple[str, ...] = ()
    attn_width_from_input: bool = False


def _hf_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    return kind if isinstance(kind, str) and type(model).__module__.startswith("transformers.") else None


def _gpt2_refuse(model: nn.Module) -> str | None:
    if getattr(getattr(model, "config", None), "add_cross_attention", False):
        return "add_cross_attention=True (cross-attention blocks) is not in the GPT-2 stream map"
    return None


def _decoder_refuse(model: nn.Module) -> str | None:
    cfg: Any = model.config
    if cfg.placement in ("post", "deepnorm", "mix"):
        return f"it is a Post-LN model (placement={cfg.placement!r}: a norm after the residual add)"
    if cfg.placement != "pre":
        return f"placement={cfg.placement!r} is not Pre-LN (only placement='pre' has a norm in front of every reader)"
    if not cfg.final_norm:
        return "final_norm=False: the head reads the raw stream, so the stream mean is read"
    if cfg.sigma_reparam:
        return "sigma_reparam=True: σReparam linears have no plain weight to rewrite"
    return None


def _is_decoder_lm(model: nn.Module) -> bool:
    from normlab.models import DecoderLM

    return isinstance(model, DecoderLM)


def _gpt2(class_name: str) -> Callable[[nn.Module], bool]:
    """Matches a Hugging Face GPT-2 model of class ``class_name`` (its head decides the stream map)."""
    return lambda m: _hf_type(m) == "gpt2" and type(m).__name__ == class_name


# One line per part of the stream: the family, the embeddings and blocks, the attention, the MLP, the end.
_GPT2 = StreamMap(
    family="gpt2", matches=_gpt2("GPT2LMHeadModel"), refuse=_gpt2_refuse,
    base="transformer", token_embedding="wte", position_embedding="wpe", blocks="h",
    attn_norm="ln_1", attn_readers=("attn.c_attn",), value=("attn.c_attn", 2, 3), attn_writer=("attn.c_proj",),
    mlp_norm="ln_2", mlp_readers=("mlp.c_fc",), mlp_writer=("mlp.c_proj",),
    final_norm="ln_f", head="lm_head", stream_dropout=("drop", "block.attn.resid_dropout", "block.mlp.dropout"),
)

STREAM_MAPS: tuple[StreamMap, ...] = (
    _GPT2,
    dataclasses.replace(_GPT2, family="gpt2-classifier", head="score", matches=_gpt2("GPT2ForSequenceClassification")),
    dataclasses.replace(_GPT2, family="gpt2-base", base="", head=None, matches=_gpt2("GPT2Model")),
    StreamMap(
        family="normlab-decoder", matches=_is_decoder_lm, refuse=_decoder_refuse,
        base="", token_embedding="embed", position_embedding="pos_embed", blocks="blocks",
        attn_norm="attn_in_norm", attn_readers=("attn.q_proj", "attn.k_proj", "attn.v_proj"),
        value=("attn.v_proj", 0, 1), attn_writer=("attn.out_proj",), attn_width_from_input=True,
        mlp_norm="mlp_in_norm", mlp_readers=("mlp.fc1", "mlp.gate_proj", "mlp.up_proj"),
        mlp_writer=("mlp.fc2", "mlp.down_proj"),
        final_norm="final_norm", head="lm_head", stream_dropout=("drop", "block.drop"),
    ),
)


@dataclass(frozen=True)
class BlockSites:
    """Full module paths of one block's stream readers and writers."""

    attn_norm: str
    attn_readers: tuple[str, ...]
    value: tuple[str, int, int]
    attn_writer: str
    mlp_norm: str
    mlp_readers: tuple[str, ...]
    mlp_writer: str

    def norms(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``(norm, readers)`` pairs in forward order."""
        return ((self.attn_norm, self.attn_readers), (self.mlp_norm, self.mlp_readers))


@dataclass(frozen=True)
class Stream:
    """A model's residual stream, resolved from its :class:`StreamMap`."""

    smap: StreamMap
    embeddings: tuple[str, ...]
    blocks: tuple[BlockSites, ...]
    final_norm: str | None
    head: str | None
    d_model: int
    dropout: tuple[str, ...]

    @property
    def token_embedding(self) -> str:
        return self.embeddings[0]

    def norms(self) -> list[str]:
        return [n for b in self.blocks for n, _ in b.norms()] + ([self.final_norm] if self.final_norm else [])

    def writers(self) -> list[str]:
        return [w for b in self.blocks for w in (b.attn_writer, b.mlp_writer)]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _present(module: nn.Module, names: Sequence[str]) -> tuple[str, ...]:
    return tuple(n for n in names if _has(module, n))


def _has(module: nn.Module, path: str) -> bool:
    try:
        obj = module.get_submodule(path.rsplit(".", 1)[0]) if "." in path else module
    except AttributeError:
        return False
    return getattr(obj, path.rsplit(".", 1)[-1], None) is not None


def resolve_stream(model: nn.Module, op: str) -> Stream:
    """The :class:`Stream` of ``model``; ``TypeError`` for a family without a map, ``ValueError`` for a Post-LN or
    otherwise unsupported model of a known family."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected an nn.Module, got {type(model).__name__}")
    kind = _hf_type(model)
    if kind in POST_LN_MODEL_TYPES:
        raise ValueError(
            f"{op}: {type(model).__name__} (model_type={kind!r}) is a Post-LN model: its LayerNorms normalise the "
            "residual stream itself after each add, so the stream mean is read and this exact rewrite does not exist "
            "(only Pre-LN models, with a norm in front of every reader, can be treated)"
        )
    smap = next((s for s in STREAM_MAPS if s.matches(model)), None)
    if smap is None:
        families = ", ".join(s.family for s in STREAM_MAPS)
        raise TypeError(
            f"{op}: unsupported model type {type(model).__name__} (model_type={kind!r}); residual-stream maps exist "
            f"for: {families} (add a StreamMap entry to normlab.surgery._residual.STREAM_MAPS for another family)"
        )
    reason = smap.refuse(model)
    if reason is not None:
        raise ValueError(f"{op}: cannot treat this {type(model).__name__}: {reason}")
    base = model.get_submodule(smap.base) if smap.base else model
    blocks_path = _join(smap.base, smap.blocks)
    sites = []
    block_list: Any = base.get_submodule(smap.blocks)
    for i, block in enumerate(block_list):
        prefix = f"{blocks_path}.{i}"
        mlp_readers = _present(block, smap.mlp_readers)
        mlp_writer = _present(block, smap.mlp_writer)
        attn_writer = _present(block, smap.attn_writer)
        if not mlp_readers or len(mlp_writer) != 1 or len(attn_writer) != 1:
            raise ValueError(f"{op}: block {prefix} does not match the {smap.family} stream map")
        sites.append(
            BlockSites(
                attn_norm=_join(prefix, smap.attn_norm),
                attn_readers=tuple(_join(prefix, r) for r in smap.attn_readers),
                value=(_join(prefix, smap.value[0]), smap.value[1], smap.value[2]),
                attn_writer=_join(prefix, attn_writer[0]),
                mlp_norm=_join(prefix, smap.mlp_norm),
                mlp_readers=tuple(_join(prefix, r) for r in mlp_readers),
                mlp_writer=_join(prefix, mlp_writer[0]),
            )
        )
    embeddings: tuple[str, ...] = (_join(smap.base, smap.token_embedding),)
    if smap.position_embedding is not None:
        embeddings += (_join(smap.base, smap.position_embedding),)
    dropout = tuple(
        f"{blocks_path}.{i}.{d[6:]}" if d.startswith("block.") else _join(smap.base, d)
        for d in smap.stream_dropout
        for i in (range(len(sites)) if d.startswith("block.") else [0])
    )
    return Stream(
        smap=smap,
        embeddings=embeddings,
        blocks=tuple(sites),
        final_norm=_join(smap.base, smap.final_norm) if smap.final_norm else None,
        head=smap.head,
        d_model=read_table(model, embeddings[0]).shape[-1],
        dropout=dropout,
    )


# ----------------------------------------------------------------------------------------------- layer access


def _is_conv1d(layer: nn.Module) -> bool:
    # Hugging Face's Conv1D (GPT-2): weight (in, out), y = x W + b.
    return type(layer).__name__ == "Conv1D" and type(layer).__module__.startswith("transformers.")


def _linear(model: nn.Module, path: str, op: str) -> Any:
    layer: Any = model.get_submodule(path)
    if parametrize.is_parametrized(layer):
        raise TypeError(f"{op}: {path} has a parametrization; remove it (or convert before parametrizing)")
    if type(layer) is not nn.Linear and not _is_conv1d(layer):
        raise TypeError(f"{op}: expected {path} to be an nn.Linear or Hugging Face Conv1D, got {type(layer).__name__}")
    return layer


def read_linear(model: nn.Module, path: str, op: str) -> tuple[Tensor, Tensor | None]:
    """``(weight, bias)`` of a linear-like layer in torch layout ``(out, in)`` (detached views)."""
    layer = _linear(model, path, op)
    w = layer.weight.detach()
    return (w.t() if _is_conv1d(layer) else w), (layer.bias.detach() if layer.bias is not None else None)


def write_linear(model: nn.Module, path: str, weight: Tensor, bias: Tensor | None) -> None:
    """Store a torch-layout ``(out, in)`` weight (and bias, created when the layer had none) into the layer at
    ``path``; a new shape replaces the parameters and updates the layer's size attributes."""
    layer = _linear(model, path, "write_linear")
    stored = weight.t().contiguous() if _is_conv1d(layer) else weight
    with torch.no_grad():
        if layer.weight.shape == stored.shape:
            layer.weight.copy_(stored)
        else:
            layer.weight = nn.Parameter(stored.clone(), requires_grad=layer.weight.requires_grad)
            out_f, in_f = weight.shape
            if _is_conv1d(layer):
                layer.nf, layer.nx = out_f, in_f
            else:
                layer.in_features, layer.out_features = in_f, out_f
        if bias is None:
            return
        if layer.bias is not None and layer.bias.shape == bias.shape:
            layer.bias.copy_(bias)
        else:
            layer.bias = nn.Parameter(bias.clone().to(layer.weight.dtype))


def read_table(model: nn.Module, path: str) -> Tensor:
    """An embedding table (``nn.Embedding`` weight or a bare parameter), d_model last (detached)."""
    obj = _resolve_attr(model, path)
    if isinstance(obj, nn.Embedding):
        return obj.weight.detach()
    if isinstance(obj, nn.Parameter):
        return obj.detach()
    raise TypeError(f"expected {path} to be an nn.Embedding or a parameter, got {type(obj).__name__}")


def write_table(model: nn.Module, path: str, table: Tensor) -> None:
    obj: Any = _resolve_attr(model, path)
    param = obj.weight if isinstance(obj, nn.Embedding) else obj
    with torch.no_grad():
        if param.shape == table.shape:
            param.copy_(table)
            return
    new = nn.Parameter(table.clone(), requires_grad=param.requires_grad)
    if isinstance(obj, nn.Embedding):
        obj.weight = new
        obj.embedding_dim = table.shape[-1]
    else:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, new)


def _resolve_attr(model: nn.Module, path: str) -> object:
    parent, _, name = path.rpartition(".")
    return getattr(model.get_submodule(parent) if parent else model, name)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def head_is_tied(model: nn.Module, stream: Stream) -> bool:
    """Whether the head's weight is the token embedding's parameter."""
    if stream.head is None:
        return False
    return model.get_submodule(stream.head).weight is read_table_param(model, stream.token_embedding)


def read_table_param(model: nn.Module, path: str) -> object:
    obj = _resolve_attr(model, path)
    return obj.weight if isinstance(obj, nn.Embedding) else obj


def untie_head(model: nn.Module, stream: Stream, report: StreamSurgeryReport, why: str) -> None:
    """Give the head its own copy of the tied token-embedding weight (and ``tie_word_embeddings=False`` in a
    Hugging Face config, so that saving and reloading keeps them apart)."""
    if stream.head is None or not head_is_tied(model, stream):
        return
    head: Any = model.get_submodule(stream.head)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        cfg.tie_word_embeddings = False
    report.add(stream.head, "untied", f"from {stream.token_embedding}: {why}")


# ----------------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class StreamChange:
    """One rewrite: the module, what happened to it (``"folded"``, ``"centered"``, ``"replaced"``, ``"untied"``,
    ``"compressed"``, ``"parametrized"``, ``"kept"``...) and the details."""

    module: str
    action: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.module}: {self.action}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class StreamSurgeryReport:
    """What an exact residual-stream surgery did.

    Attributes:
        model: the rewritten model (the input itself when ``inplace=True``, else a rewritten deep copy).
        op: the operation (``"fold_ln"``, ``"convert_to_rms_norm"``, ...).
        family: the residual-stream map used.
        changes: every rewrite, in order.
        notes: what a user must know about the result (config fields that no longer describe it, ...).
        inplace: whether ``model`` is the module that was passed in.
    """

    model: nn.Module
    op: str
    family: str
    changes: list[StreamChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inplace: bool = False

    def add(self, module: str, action: str, detail: str = "") -> None:
        self.changes.append(StreamChange(module, action, detail))

    def by_action(self, action: str) -> list[StreamChange]:
        return [c for c in self.changes if c.action == action]

    @property
    def kept(self) -> list[StreamChange]:
        """What was deliberately left in place (e.g. a final-norm β with no head bias to take it)."""
        return self.by_action("kept")

    def __str__(self) -> str:
        lines = [f"{self.op} ({self.family}): {len(self.changes)} change(s)"]
        lines += [f"  {c}" for c in self.changes]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
