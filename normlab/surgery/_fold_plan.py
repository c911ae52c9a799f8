"""Where each norm of a model would fold: the planning half of :func:`normlab.surgery.fold_norms`.

Three ways to find the layers a norm folds into, all producing :class:`Plan` (a fold to try) or :class:`Refusal`
(a norm that cannot fold exactly, and why):

* normlab's own models (:class:`~normlab.models.DecoderLM`, :class:`~normlab.models.ViTEncoder`): the known block
  structure and placement (``Block.out_norm_position`` tells a branch-output norm from a norm after the residual add);
* any other ``nn.Module``: ``torch.fx`` symbolic tracing with norms as leaves; a norm folds into the one linear/conv
  whose output it alone reads (PyTorch's conv→BN direction), or else into its users when every user is a linear/conv
  taking the norm's output as its only input;
* an explicit ``{norm_path: [consumer paths]}`` map from the user.

Nothing here mutates the model. Folding math: :mod:`normlab.surgery.fold_math`.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch.fx
from torch import nn

from normlab.walk import is_norm, norm_protocol, spec_of

__all__ = ["Plan", "Refusal", "plan_fx", "plan_map", "plan_structure"]

Direction = Literal["into_consumers", "into_producer"]

FOLD_TARGETS: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass(frozen=True)
class Plan:
    """A fold to validate: ``norm`` into ``targets`` in ``direction``.

    ``shift_factor`` multiplies the norm's shift before a consumer fold (LayerNorm Scaling scales the norm's output by
    ``1/sqrt(ℓ)`` before the consumers, and that factor stays in the graph). ``repeat`` tiles the norm's affine over
    the producer's outputs (a per-head q/k norm over ``d_head`` after a ``d_model``-wide projection).
    """

    norm: str
    direction: Direction
    targets: tuple[str, ...]
    found_by: str
    shift_factor: float = 1.0
    repeat: int = 1


@dataclass(frozen=True)
class Refusal:
    """A norm that is not folded, the reason, and the exception type a strict fold raises for it."""

    norm: str
    norm_type: str
    reason: str
    error: type[Exception] = field(default=ValueError, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.norm} ({self.norm_type}): {self.reason}"


def _refuse(norms: Mapping[str, nn.Module], path: str, reason: str, error: type[Exception] = ValueError) -> Refusal:
    return Refusal(path, type(norms[path]).__name__, reason, error)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def plan_structure(model: nn.Module, norms: Mapping[str, nn.Module]) -> list[Plan | Refusal]:
    """Plans for a :class:`~normlab.models.DecoderLM` / :class:`~normlab.models.ViTEncoder` from its known structure."""
    from normlab.models.block import Block

    out: list[Plan | Refusal] = []
    covered: set[str] = set()

    def add(norm: str | None, item: Plan | Refusal | None) -> None:
        if norm is not None and norm in norms and item is not None:
            out.append(item)
            covered.add(norm)

    for bpath, block in model.named_modules():
        if not isinstance(block, Block):
            continue
        attn, mlp = block.attn, block.mlp
        a_path, m_path = _join(bpath, "attn"), _join(bpath, "mlp")
        qkv = tuple(_join(a_path, n) for n in ("q_proj", "k_proj", "v_proj"))
        gelu = mlp.kind == "gelu"
        mlp_in = (_join(m_path, "fc1"),) if gelu else (_join(m_path, "gate_proj"), _join(m_path, "up_proj"))
        mlp_out = _join(m_path, "fc2" if gelu else "down_proj")
        for slot, consumers in (("attn_in_norm", qkv), ("mlp_in_norm", mlp_in)):
            path = _join(bpath, slot)
            add(path, Plan(path, "into_consumers", consumers, "structure", shift_factor=block.branch_scale))
        for slot, producer in (("attn_out_norm", _join(a_path, "out_proj")), ("mlp_out_norm", mlp_out)):
            path = _join(bpath, slot)
            if path not in norms:
                continue
            if block.out_norm_position == "branch":
                add(path, Plan(path, "into_producer", (producer,), "structure"))
            else:
                add(
                    path,
                    _refuse(
                        norms,
                        path,
                        f"its output is the residual stream (placement={block.placement!r}, norm after the residual "
                        "add): no adjacent linear layer sees it alone, so a local fold cannot be exact (the stream "
                        "re-parameterisation SLAB uses for its final norm is not implemented)",
                    ),
                )
        inner = _join(m_path, "inner_norm")
        add(inner, Plan(inner, "into_consumers", (mlp_out,), "structure"))
        repeat = attn.n_heads if attn.qk_norm_per_head else 1
        for which in ("q", "k"):
            path = _join(a_path, f"{which}_norm")
            add(path, Plan(path, "into_producer", (_join(a_path, f"{which}_proj"),), "structure", repeat=repeat))
    head = "lm_head" if isinstance(getattr(model, "lm_head", None), nn.Module) else "head"
    add("final_norm", Plan("final_norm", "into_consumers", (head,), "structure"))
    for path in norms:
        if path not in covered:
            out.append(
                _refuse(norms, path, "not at a position the model's known structure folds; pass consumers={...}")
            )
    return out


class _NormLeafTracer(torch.fx.Tracer):
    """Keeps every norm a single ``call_module`` node, whatever package it comes from."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_norm(m) or super().is_leaf_module(m, module_qualified_name)


_META_ATTRS = ("shape", "dtype", "device", "ndim", "is_cuda")
_META_METHODS = ("size", "dim")


def _reads_values(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Whether ``user`` depends on ``node``'s values, not only on its shape/dtype (which a fold keeps)."""
    if user.op == "call_function" and user.target is getattr and user.args[1:2] and user.args[1] in _META_ATTRS:
        return False
    return not (user.op == "call_method" and user.target in _META_METHODS and user.args[:1] == (node,))


def _describe(node: torch.fx.Node) -> str:
    return f"{node.op} {node.target}" if node.op != "call_function" else f"call_function {node.target}"


def _optional_defaults(model: nn.Module) -> dict[str, object]:
    """``forward``'s optional arguments at their defaults (``labels=None``, ``output_hidden_states=False``): traced
    as placeholders they would be proxies, and a forward that branches on them could not be traced."""
    params = inspect.signature(model.forward).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params if p.kind in kinds and p.default is not inspect.Parameter.empty}


def plan_fx(model: nn.Module, norms: Mapping[str, nn.Module]) -> list[Plan | Refusal]:
    """Plans for a plain module graph from ``torch.fx`` symbolic tracing."""
    if not norms:
        return []
    try:
        graph = _NormLeafTracer().trace(model, concrete_args=_optional_defaults(model))
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...) for untraceable Python
        raise TypeError(
            f"fold_norms: could not trace {type(model).__name__} with torch.fx to find the layers each norm feeds "
            f"({type(exc).__name__}: {exc}); pass consumers={{'norm.path': ['linear.path', ...]}} instead"
        ) from exc
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attr_uses = [str(n.target) for n in graph.nodes if n.op == "get_attr"]

    def foldable_layer(target: object) -> bool:
        if not isinstance(target, str) or calls[target] != 1:
            return False
        if not isinstance(modules.get(target), FOLD_TARGETS):
            return False
        return not any(a == target or a.startswith(target + ".") for a in attr_uses)

    out: list[Plan | Refusal] = []
    for path in norms:
        nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == path]
        if len(nodes) != 1:
            out.append(_refuse(norms, path, f"called {len(nodes)} times in the traced forward; a fold needs exactly 1"))
            continue
        node = nodes[0]
        src = node.args[0] if node.args else None
        if (
            not _has_keep(norms[path])
            and isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and foldable_layer(src.target)
            and len(src.users) == 1
        ):
            out.append(Plan(path, "into_producer", (str(src.target),), "fx"))
            continue
        users = [u for u in node.users if _reads_values(u, node)]
        if users and all(
            u.op == "call_module" and foldable_layer(u.target) and u.args == (node,) and not u.kwargs for u in users
        ):
            out.append(Plan(path, "into_consumers", tuple(str(u.target) for u in users), "fx"))
            continue
        others = [_describe(u) for u in users if not (u.op == "call_module" and foldable_layer(u.target))]
        detail = ", ".join(others) if others else "a layer that also takes other inputs or is called more than once"
        out.append(
            _refuse(
                norms,
                path,
                f"its input is not the output of a single linear/conv used only by it, and its output feeds {detail} "
                "(not only linear/conv layers that read nothing else): e.g. a residual stream, where a local fold "
                "cannot be exact; pass consumers={...} if you know better",
            )
        )
    return out


def _has_keep(norm: nn.Module) -> bool:
    """Whether the norm keeps a per-token module in the graph when folded (PowerNorm's GroupScaling)."""
    spec = spec_of(norm)
    if spec is None or not spec.foldable:
        return False
    try:
        return norm_protocol(norm).folded_affine().keep is not None
    except Exception:  # validation reports later why it is not foldable
        return False


def plan_map(
    model: nn.Module, norms: Mapping[str, nn.Module], consumers: Mapping[str, Sequence[str] | str]
) -> list[Plan | Refusal]:
    """Plans from an explicit ``{norm_path: [consumer paths]}`` map (the user vouches these are all the consumers)."""
    if not isinstance(consumers, Mapping):
        raise TypeError(f"fold_norms: expected consumers to be a dict {{norm_path: [paths]}}, got {type(consumers)}")
    modules = dict(model.named_modules())
    out: list[Plan | Refusal] = []
    for path, targets in consumers.items():
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(path, str) or not isinstance(targets, Sequence) or not targets:
            raise TypeError(
                f"fold_norms: expected consumers entries 'norm.path': ['linear.path', ...], got {path!r}: {targets!r}"
            )
        for p in (path, *targets):
            if not isinstance(p, str) or p not in modules:
                raise ValueError(f"fold_norms: consumers names {p!r}, which is not a submodule path of the model")
        if path not in norms:
            raise ValueError(
                f"fold_norms: consumers key {path!r} is a {type(modules[path]).__name__}, not a norm; norms in the "
                f"model: {sorted(norms) or 'none'}"
            )
        out.append(Plan(path, "into_consumers", tuple(targets), "map"))
    return out
