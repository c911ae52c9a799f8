"""LayerNorm removal by fine-tuning (Baroni, Khara, Schaeffer, Subkhankulov, Heimersheim 2025, "Transformers Don't Need
LayerNorm at Inference Time", https://arxiv.org/abs/2507.02559): :func:`prepare_ln_removal`, :func:`calibrate_sigma`,
:class:`RemovalSchedule`, :class:`StdAuxLoss`; the final fold is :func:`normlab.surgery.export_removed_ln`.

Every LayerNorm becomes a :class:`~normlab.nn.FakeLayerNorm` that computes exactly what it did, with a constant σ̄ per
norm estimated from calibration batches (the paper's global standard deviation of the norm's input over all positions
but the first and all channels). During fine-tuning a schedule switches the norms one at a time to their fixed-scale
form ``γ (x − mean x)/σ̄ + β``; once all are switched the model is linear in its residual stream apart from attention's
softmax and the MLP activation, and the norms fold into the adjacent weights.

Where the model has a residual-stream map (Pre-LN GPT-2 and normlab's ``DecoderLM``, :mod:`normlab.surgery._residual`)
the switches follow the paper's order: every block's MLP-input norm (GPT-2's ``ln_2``), then the attention-input norms'
query/key path, then their value path, then the final norm. The attention-input norm has two switches because the
paper switches the value path separately from the query/key path: a :class:`SplitFakeLayerNorm` computes the value
input with its own switch and a forward hook on the value projection (for GPT-2's fused ``c_attn``: its value third)
recomputes that projection from it. Any other model (Post-LN BERT such as all-MiniLM-L6-v2, whose LayerNorms normalise
the stream itself) has its LayerNorms switched one at a time in module order, each as a whole: a Post-LN norm's output
is the stream, read by the next sublayer's q, k and v and by the skip connection alike.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.functional.fixed_scale_layer_norm import fixed_scale_layer_norm
from normlab.nn.fixed_scale_layer_norm import FakeLayerNorm
from normlab.nn.layer_norm import LayerNorm
from normlab.surgery._residual import Stream, resolve_stream, set_module

__all__ = [
    "LNRemoval",
    "LNSwitch",
    "RemovalSchedule",
    "SplitFakeLayerNorm",
    "StdAuxLoss",
    "calibrate_sigma",
    "prepare_ln_removal",
]

Group = Literal["mlp", "attn_qk", "attn_v", "final", "ln"]
GROUP_ORDER: tuple[Group, ...] = ("mlp", "attn_qk", "attn_v", "final", "ln")


class SplitFakeLayerNorm(FakeLayerNorm):
    """A :class:`~normlab.nn.FakeLayerNorm` in front of an attention whose value path has its own switch.

    ``fixed`` switches the output (what the query and key projections read); ``fixed_v`` switches the value
    projection's input, which is computed here when the two switches differ and consumed by the forward hook that
    :func:`prepare_ln_removal` puts on the value projection. γ, β and σ̄ are shared by both paths (one LayerNorm of
    the original model), so once both are switched it is an ordinary fixed-scale LayerNorm again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fixed_v = self.fixed
        self.v_input: Tensor | None = None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        y = super().forward(x)
        self.v_input = None
        if self.fixed_v != self.fixed:
            kwargs = self.functional_kwargs() | {"fixed": self.fixed_v}
            self.v_input = fixed_scale_layer_norm(x, **kwargs)
        return y

    def get_extra_state(self) -> dict[str, Any]:
        return {"fixed": self.fixed, "fixed_v": self.fixed_v}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        if isinstance(state, dict) and isinstance(state.get("fixed_v"), bool):
            self.fixed_v = state["fixed_v"]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fixed={self.fixed}, fixed_v={self.fixed_v}"


class _ValuePathHook:
    """Forward hook on a value projection: rows ``[chunk·n, (chunk+1)·n)`` of its output recomputed from the value
    input its :class:`SplitFakeLayerNorm` stored (a callable object, so ``copy.deepcopy`` of the model rebinds it)."""

    def __init__(self, norm: SplitFakeLayerNorm, chunk: int, chunks: int) -> None:
        self.norm, self.chunk, self.chunks = norm, chunk, chunks

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor | None:
        x_v = self.norm.v_input
        if x_v is None:
            return None
        self.norm.v_input = None
        n = output.shape[-1] // self.chunks
        lo, hi = self.chunk * n, (self.chunk + 1) * n
        weight: Tensor = module.weight  # type: ignore[assignment]
        bias: Tensor | None = module.bias  # type: ignore[assignment]
        b = bias[lo:hi] if bias is not None else None
        if isinstance(module, nn.Linear):
            y_v = F.linear(x_v, weight[lo:hi], b)
        else:  # Hugging Face Conv1D: weight (in, out), y = x W + b
            y_v = x_v @ weight[:, lo:hi] + (b if b is not None else 0)
        return torch.cat([output[..., :lo], y_v.to(output.dtype), output[..., hi:]], dim=-1)


@dataclass(frozen=True)
class LNSwitch:
    """One switch of the removal: the norm at ``module`` (its value path only when ``group == "attn_v"``)."""

    name: str
    module: str
    group: Group
    block: int | None = None


@dataclass
class LNRemoval:
    """A model prepared for LayerNorm removal (:func:`prepare_ln_removal`).

    Attributes:
        model: the model, its LayerNorms replaced by :class:`~normlab.nn.FakeLayerNorm` (real mode).
        switches: every switch, in the order the removal flips them.
        family: the residual-stream map used (``None``: LayerNorms in module order, none split).
        notes: what a user must know (why no stream map was used, ...).
    """

    model: nn.Module
    switches: list[LNSwitch]
    family: str | None
    notes: list[str] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list, repr=False)

    def norms(self) -> dict[str, FakeLayerNorm]:
        """Every :class:`~normlab.nn.FakeLayerNorm` by module path."""
        out: dict[str, FakeLayerNorm] = {}
        for s in self.switches:
            m = self.model.get_submodule(s.module)
            assert isinstance(m, FakeLayerNorm)
            out[s.module] = m
        return out

    def _get(self, name: str) -> LNSwitch:
        for s in self.switches:
            if s.name == name:
                return s
        raise KeyError(f"LNRemoval: unknown switch {name!r}; switches are: {', '.join(s.name for s in self.switches)}")

    def is_fixed(self, name: str) -> bool:
        s = self._get(name)
        norm = self.model.get_submodule(s.module)
        return bool(getattr(norm, "fixed_v") if s.group == "attn_v" else getattr(norm, "fixed"))  # noqa: B009

    def fix(self, name: str) -> None:
        """Switch ``name`` to its fixed-scale form."""
        s = self._get(name)
        norm = self.model.get_submodule(s.module)
        setattr(norm, "fixed_v" if s.group == "attn_v" else "fixed", True)

    def fix_all(self) -> None:
        for s in self.switches:
            self.fix(s.name)

    @property
    def pending(self) -> list[str]:
        """The switches not flipped yet, in order."""
        return [s.name for s in self.switches if not self.is_fixed(s.name)]


def _is_layer_norm(m: nn.Module) -> bool:
    if isinstance(m, FakeLayerNorm):
        return False
    if type(m) is nn.LayerNorm:
        return len(m.normalized_shape) == 1
    return isinstance(m, LayerNorm) and m.channel_dim == -1 and not isinstance(m.normalized_shape, tuple)


def _try_stream(model: nn.Module) -> tuple[Stream | None, str | None]:
    try:
        return resolve_stream(model, "prepare_ln_removal"), None
    except (TypeError, ValueError) as exc:
        return None, str(exc)


def _stream_switches(stream: Stream) -> list[LNSwitch]:
    by_group: dict[Group, list[LNSwitch]] = {g: [] for g in GROUP_ORDER}
    for i, b in enumerate(stream.blocks):
        by_group["mlp"].append(LNSwitch(b.mlp_norm, b.mlp_norm, "mlp", i))
        by_group["attn_qk"].append(LNSwitch(b.attn_norm + ":qk", b.attn_norm, "attn_qk", i))
        by_group["attn_v"].append(LNSwitch(b.attn_norm + ":v", b.attn_norm, "attn_v", i))
    if stream.final_norm is not None:
        by_group["final"].append(LNSwitch(stream.final_norm, stream.final_norm, "final"))
    return [s for g in GROUP_ORDER for s in by_group[g]]


def prepare_ln_removal(
    model: nn.Module, *, split_value_path: bool = True, momentum: float | None = None, inplace: bool = False
) -> LNRemoval:
    """Replace every LayerNorm of ``model`` by an equivalent :class:`~normlab.nn.FakeLayerNorm` (real mode, σ̄ = 1
    until :func:`calibrate_sigma`) and list the switches of the removal in the paper's order (see the module docstring).

    Args:
        model: any model with ``torch.nn.LayerNorm`` or normlab ``LayerNorm`` modules over the last axis. Pre-LN GPT-2
            and ``DecoderLM`` get the paper's grouping and the value-path split; other models their LayerNorms in
            module order.
        split_value_path: give the attention-input norms of a Pre-LN model a separate value-path switch.
        momentum: let each norm track σ̄ while it is real and training (``FakeLayerNorm(momentum=...)``; the authors'
            ``EXP_RECOMPUTE_STD_ON_REAL``; their LoRA variant uses 0.9): σ̄ is then the current scale when the norm is
            switched, not the scale of the original model. Default ``None``: σ̄ stays at its calibrated value.
        inplace: rewrite ``model`` itself; default: a deep copy, returned as ``.model``.

    Returns:
        An :class:`LNRemoval`; its ``model`` computes exactly what ``model`` computed.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``. ValueError: it has no LayerNorm to remove.

    Example:
        >>> from normlab.models import DecoderLM, TransformerConfig
        >>> lm = DecoderLM(TransformerConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=32))
        >>> [s.name for s in prepare_ln_removal(lm).switches]
        ['blocks.0.mlp_in_norm', 'blocks.0.attn_in_norm:qk', 'blocks.0.attn_in_norm:v', 'final_norm']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_ln_removal: expected an nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    stream, why = _try_stream(target)
    notes: list[str] = []
    if stream is not None:
        switches = _stream_switches(stream)
        if not split_value_path:
            switches = [
                LNSwitch(s.module, s.module, s.group, s.block) if s.group == "attn_qk" else s
                for s in switches if s.group != "attn_v"
            ]
    else:
        notes.append(f"no residual-stream map ({why}); LayerNorms switched one at a time in module order, none split")
        switches = [LNSwitch(n, n, "ln") for n, m in target.named_modules() if _is_layer_norm(m)]
    for s in switches:
        if not _is_layer_norm(target.get_submodule(s.module)) and not isinstance(
            target.get_submodule(s.module), FakeLayerNorm
        ):
            raise TypeError(
                f"prepare_ln_removal: expected a LayerNorm over the last axis at {s.module}, got "
                f"{type(target.get_submodule(s.module)).__name__}"
            )
    if not switches:
        raise ValueError(f"prepare_ln_removal: {type(model).__name__} has no LayerNorm over the last axis to remove")
    removal = LNRemoval(target, switches, stream.smap.family if stream is not None else None, notes)
    split = {s.module for s in switches if s.group == "attn_v"}
    for s in switches:
        norm = target.get_submodule(s.module)
        if isinstance(norm, FakeLayerNorm):
            continue
        cls = SplitFakeLayerNorm if s.module in split else FakeLayerNorm
        set_module(target, s.module, cls.from_layer_norm(norm, momentum=momentum))
    if stream is not None:
        for b in stream.blocks:
            fake = target.get_submodule(b.attn_norm)
            if isinstance(fake, SplitFakeLayerNorm):
                path, chunk, chunks = b.value
                hook = _ValuePathHook(fake, chunk, chunks)
                removal.hooks.append(target.get_submodule(path).register_forward_hook(hook))
    return removal


def _call(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None) -> Any:
    if forward is not None:
        return forward(model, batch)
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


@torch.no_grad()
def calibrate_sigma(
    removal: LNRemoval,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    skip_first: bool = True,
) -> dict[str, float]:
    """Set every norm's σ̄ to the standard deviation of its input on ``batches`` (the paper's estimate: one global,
    unbiased standard deviation over all channels and all positions but the first, where GPT-2's BOS token sits).

    Args:
        removal: from :func:`prepare_ln_removal`.
        batches: model inputs: tensors (``model(batch)``) or mappings (``model(**batch)``; an ``attention_mask``
            there keeps padding out of the statistic).
        forward: ``forward(model, batch)`` instead of the default call.
        skip_first: leave position 0 out (``False``: every position).

    Returns:
        ``{module path: σ̄}``.

    Raises:
        ValueError: no batch reached a norm.
    """
    sums: dict[str, list[float]] = {s.module: [0.0, 0.0, 0.0] for s in removal.switches}
    state: dict[str, Tensor | None] = {"mask": None}
    handles = []

    def hook(path: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().double()
            mask = state["mask"]
            if x.dim() >= 3 and mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
                keep = mask.bool().clone()
                if skip_first:
                    keep[:, 0] = False
                vals = x[keep]
            else:
                vals = x[:, 1:] if skip_first and x.dim() >= 3 else x
            acc = sums[path]
            acc[0] += vals.numel()
            acc[1] += float(vals.sum())
            acc[2] += float((vals * vals).sum())

        return record

    for path in sums:
        handles.append(removal.model.get_submodule(path).register_forward_pre_hook(hook(path)))
    was_training = removal.model.training
    removal.model.eval()
    try:
        for batch in batches:
            state["mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            _call(removal.model, batch, forward)
    finally:
        for h in handles:
            h.remove()
        removal.model.train(was_training)
    out: dict[str, float] = {}
    for path, (n, s, ss) in sums.items():
        if n < 2:
            raise ValueError(f"calibrate_sigma: no batch reached {path} (expected model inputs that run the model)")
        sigma = ((ss - s * s / n) / (n - 1)) ** 0.5
        norm = removal.model.get_submodule(path)
        assert isinstance(norm, FakeLayerNorm)
        norm.sigma.fill_(sigma)
        out[path] = sigma
    return out


class RemovalSchedule:
    """The staged removal as a callback for any training loop: call it with the optimizer step before each step
    (``schedule(step)``), or hand it to a Hugging Face ``Trainer`` (it has ``on_step_begin``). Every switch scheduled at
    or before ``step`` is flipped; the names flipped by this call are returned.

    Args:
        removal: from :func:`prepare_ln_removal`.
        steps: ``{switch name: optimizer step}``; every switch of ``removal`` must have one.

    The constructors :meth:`staged` (the paper's per-group ``start + i·gap``) and :meth:`evenly` build ``steps``.
    """

    def __init__(self, removal: LNRemoval, steps: Mapping[str, int]) -> None:
        names = [s.name for s in removal.switches]
        missing = [n for n in names if n not in steps]
        unknown = [n for n in steps if n not in names]
        if missing or unknown:
            raise ValueError(
                f"RemovalSchedule: expected one step per switch; missing: {missing or '-'}, unknown: {unknown or '-'}"
            )
        for n, v in steps.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"RemovalSchedule: expected the step of {n} to be an int >= 0, got {v!r}")
        self.removal = removal
        self.steps = {n: int(steps[n]) for n in names}

    @classmethod
    def staged(cls, removal: LNRemoval, groups: Mapping[str, tuple[int, int]]) -> RemovalSchedule:
        """Block ``i`` of group ``g`` switches at ``start + i·gap`` for ``groups[g] = (start, gap)`` (groups:
        ``mlp``, ``attn_qk``, ``attn_v``, ``final``; ``ln`` for a model without a stream map, where ``i`` counts its
        norms). The paper's GPT-2 small run is ``{"mlp": (20, 2), "attn_qk": (44, 2), "attn_v": (68, 3),
        "final": (104, 0)}`` over 300 steps."""
        steps: dict[str, int] = {}
        counters: dict[str, int] = {}
        for s in removal.switches:
            if s.group not in groups:
                raise ValueError(f"RemovalSchedule.staged: expected a (start, gap) for group {s.group!r}")
            start, gap = groups[s.group]
            i = s.block if s.block is not None else counters.get(s.group, 0)
            counters[s.group] = counters.get(s.group, 0) + 1
            steps[s.name] = int(start + i * gap)
        return cls(removal, steps)

    @classmethod
    def evenly(cls, removal: LNRemoval, start: int, stop: int) -> RemovalSchedule:
        """The switches in order, spread evenly over the steps ``start`` .. ``stop``."""
        if not 0 <= start <= stop:
            raise ValueError(f"RemovalSchedule.evenly: expected 0 <= start <= stop, got start={start}, stop={stop}")
        k = len(removal.switches)
        at = [start + round(i * (stop - start) / max(k - 1, 1)) for i in range(k)]
        return cls(removal, {s.name: a for s, a in zip(removal.switches, at)})

    @property
    def last_step(self) -> int:
        """The step of the last switch."""
        return max(self.steps.values())

    @property
    def done(self) -> bool:
        return not self.removal.pending

    def __call__(self, step: int) -> list[str]:
        flipped = []
        for name, at in self.steps.items():
            if at <= step and not self.removal.is_fixed(name):
                self.removal.fix(name)
                flipped.append(name)
        return flipped

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Hugging Face ``TrainerCallback`` hook: flips what is due at ``state.global_step``."""
        self(int(state.global_step))
        return control


class StdAuxLoss:
    """The paper's optional auxiliary loss ``w · mean_t (std_t(h) − target)²``: ``h`` is the input of the final norm
    (the last switch's norm for a model without a stream map), ``std_t`` each token's standard deviation (biased, eps
    1e-5 inside the root, as LayerNorm), ``target`` their mean over the batch (no gradient), position 0 left out.
    It pulls every token's residual-stream scale toward one value, which the fixed σ̄ then matches.

    ``where="all"`` (not in the paper) puts the term on the input of every norm of the removal, each relative to its
    own scale (``(std_t/target − 1)²``, averaged over the norms) and with position 0 included: before a norm is
    switched its output does not depend on a token's scale, so the model can equalise the scales (a BERT [CLS] token's
    is 15x the others' at some norms) without changing its output, and the fixed σ̄ then fits every token.

    Call ``aux()`` after the model's forward to get the term for that forward; :meth:`remove` takes the hooks out.

    Args:
        removal: from :func:`prepare_ln_removal`.
        weight: ``w`` (the paper: 0.1 for GPT-2 small/medium, 0.03 large, 0.01 XL).
        where: ``"final"`` (the paper) or ``"all"``.
    """

    def __init__(self, removal: LNRemoval, weight: float = 0.1, *, where: str = "final") -> None:
        if where not in ("final", "all"):
            raise ValueError(f"StdAuxLoss: expected where 'final' or 'all', got {where!r}")
        finals = [s.module for s in removal.switches if s.group == "final"]
        if where == "all":
            paths = list(dict.fromkeys(s.module for s in removal.switches))
        else:
            paths = [finals[0] if finals else removal.switches[-1].module]
        self.weight = float(weight)
        self.where = where
        self.module = paths[0] if where == "final" else "every norm"
        self._h: dict[str, Tensor] = {}
        self._handles = [
            removal.model.get_submodule(p).register_forward_pre_hook(self._recorder(p)) for p in paths
        ]

    def _recorder(self, path: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            self._h[path] = inputs[0]

        return record

    def __call__(self) -> Tensor:
        if not self._h:
            raise RuntimeError(f"StdAuxLoss: no forward reached {self.module} since the last call")
        terms = []
        for h in self._h.values():
            if self.where == "final" and h.dim() >= 3:
                h = h[:, 1:]
            std = (h.float().var(-1, unbiased=False) + 1e-5).sqrt()
            target = std.mean().detach()
            terms.append(((std - target) ** 2).mean() if self.where == "final" else ((std / target - 1) ** 2).mean())
        self._h = {}
        return self.weight * torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
