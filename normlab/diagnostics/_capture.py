"""Shared plumbing of the diagnostics: layer discovery, running a model on a batch, block input/output capture,
padding masks and float64 accumulators that pool statistics over several batches.

The layer conventions follow the papers whose diagnostics this package measures (Gromov et al. 2024, https://arxiv.org/abs/2403.17887;
Mix-LN, https://arxiv.org/abs/2412.13795; LayerNorm Scaling, https://arxiv.org/abs/2502.05795): block ``ℓ`` is
1-based, ``x_ℓ`` enters block ``ℓ`` and ``x_{ℓ+1}`` leaves it; layer 0 is the embedding output (the input of block 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Batch",
    "Batches",
    "BlockCapture",
    "Layers",
    "LossFn",
    "Row",
    "as_batches",
    "find_layers",
    "first_tensor",
    "get_loss",
    "run_model",
    "token_mask",
]

Row = dict[str, Any]
Batch = Tensor | Mapping[str, Any]
LossFn = Callable[[Any, Mapping[str, Any]], Tensor]
Batches = Batch | Iterable[Batch]  # one batch or several
Layers = Sequence[nn.Module] | str | None  # the blocks, an attribute path to them, or None: discovered

# Where common Hugging Face architectures keep their block list (BERT/RoBERTa, LLaMA/Mistral/Qwen, GPT-2,
# OPT, GPT-NeoX/Pythia, T5 encoders, ViT); the first attribute path that resolves to a ModuleList wins.
_LAYER_PATHS = (
    "blocks",
    "encoder.layer",
    "model.layers",
    "layers",
    "transformer.h",
    "h",
    "model.decoder.layers",
    "decoder.layers",
    "gpt_neox.layers",
    "encoder.block",
    "encoder.layers",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "vit.encoder.layer",
)


def _resolve(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layers(model: nn.Module, layers: Layers = None) -> list[nn.Module]:
    """The model's blocks in forward order.

    Args:
        model: a normlab model (``model.blocks``) or a Hugging Face model.
        layers: explicit blocks (a sequence of modules), an attribute path such as ``"encoder.layer"``, or ``None``
            to search the usual places (``blocks``, ``encoder.layer``, ``model.layers``, ``transformer.h``, ...).

    Raises:
        ValueError: no block list was found, or ``layers`` names nothing usable.
        TypeError: ``layers`` has the wrong type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnostics: expected model to be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(layers, str):
        found = _resolve(model, layers)
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ValueError(
                f"diagnostics: layers={layers!r} must name a non-empty ModuleList of the model, got "
                f"{type(found).__name__}"
            )
        return list(found)
    if layers is not None:
        if isinstance(layers, nn.Module) and not isinstance(layers, (nn.ModuleList, nn.Sequential)):
            raise TypeError(f"diagnostics: expected layers to be a sequence of modules, got {type(layers).__name__}")
        out = list(layers)
        bad = [type(m).__name__ for m in out if not isinstance(m, nn.Module)]
        if not out or bad:
            raise ValueError(f"diagnostics: expected layers to be a non-empty sequence of nn.Module, got {bad or out}")
        return out
    for path in _LAYER_PATHS:
        found = _resolve(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return list(found)
    raise ValueError(
        f"diagnostics: could not find the block list of {type(model).__name__} (looked for "
        f"{', '.join(_LAYER_PATHS)}); pass layers= (a list of modules or an attribute path)"
    )


def as_batches(batches: Batches) -> list[dict[str, Any]]:
    """Normalise one batch or an iterable of batches to a list of keyword dicts for ``model(**batch)``.

    A batch is a token-id tensor ``(B, N)`` or a mapping such as ``{"input_ids", "attention_mask", "labels"}``
    (a tokenizer's ``BatchEncoding`` works).
    """
    if isinstance(batches, Tensor):
        return [{"input_ids": batches}]
    if isinstance(batches, Mapping):
        return [dict(batches)]
    if isinstance(batches, Iterable) and not isinstance(batches, (str, bytes)):
        out: list[dict[str, Any]] = []
        for b in batches:
            if isinstance(b, Tensor):
                out.append({"input_ids": b})
            elif isinstance(b, Mapping):
                out.append(dict(b))
            else:
                raise TypeError(
                    f"diagnostics: expected each batch to be a Tensor of input ids or a mapping, got {type(b).__name__}"
                )
        if not out:
            raise ValueError("diagnostics: expected at least one batch, got an empty iterable")
        return out
    raise TypeError(
        f"diagnostics: expected batch to be a Tensor, a mapping or an iterable of them, got {type(batches).__name__}"
    )


def token_mask(batch: Mapping[str, Any], shape: Sequence[int], device: torch.device) -> Tensor:
    """Bool ``(B, N)`` mask of valid tokens for hidden states of shape ``(B, N, ...)``: the batch's
    ``attention_mask`` (1/True = real token) where its shape matches, else all positions."""
    mask = batch.get("attention_mask")
    b, n = int(shape[0]), int(shape[1])
    if isinstance(mask, Tensor):
        if tuple(mask.shape) != (b, n):
            raise ValueError(
                f"diagnostics: expected attention_mask of size {[b, n]} (the hidden states' [B, N]), "
                f"got {list(mask.shape)}"
            )
        return mask.to(device=device).bool()
    return torch.ones(b, n, dtype=torch.bool, device=device)


def first_tensor(value: Any) -> Tensor | None:
    """The hidden-state tensor of a block's input or output: the value itself or the first element of a tuple
    (Hugging Face layers may return ``(hidden_states, attn_weights, ...)``)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def block_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    """The residual stream entering a block: its first positional argument or ``hidden_states=``."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    hs = kwargs.get("hidden_states", kwargs.get("x"))
    return hs if isinstance(hs, Tensor) else None


def run_model(model: nn.Module, batch: Mapping[str, Any], **extra: Any) -> Any:
    """``model(**batch, **extra)``."""
    return model(**batch, **extra)


def get_loss(output: Any, batch: Mapping[str, Any], loss_fn: LossFn | None) -> Tensor:
    """The scalar loss: ``loss_fn(output, batch)`` if given, else the output's ``loss``.

    Raises:
        ValueError: no ``loss_fn`` and the output has no loss (give the batch ``labels`` or pass ``loss_fn``).
    """
    if loss_fn is not None:
        loss: Any = loss_fn(output, batch)
    else:
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is None:
            raise ValueError(
                f"diagnostics: the model output ({type(output).__name__}) has no loss; put labels in the batch or "
                "pass loss_fn=(output, batch) -> scalar Tensor"
            )
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"diagnostics: expected the loss to be a scalar Tensor, got {got}")
    return loss.reshape(())


@dataclass
class BlockCapture:
    """Hooks that record each block's input and output hidden states during forward passes.

    ``inputs[i]`` / ``outputs[i]`` hold the tensors of block ``i + 1`` from the last forward. With
    ``retain_grad=True`` the outputs keep their gradients (``outputs[i].grad`` after backward).
    """

    layers: list[nn.Module]
    detach: bool = True
    inputs: list[Tensor | None] = field(default_factory=list)
    outputs: list[Tensor | None] = field(default_factory=list)
    skip: int | None = None  # 1-based block whose output is replaced by its input (D2 layer removal)

    def __post_init__(self) -> None:
        self.inputs = [None] * len(self.layers)
        self.outputs = [None] * len(self.layers)

    @contextmanager
    def attached(self) -> Iterator[BlockCapture]:
        handles = []
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(self._post_hook(i), with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _pre_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = block_input(args, kwargs)
            self.inputs[i] = x.detach() if (x is not None and self.detach) else x

        return hook

    def _post_hook(self, i: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            if self.skip == i + 1:
                output = _replace_hidden(output, block_input(args, kwargs))
            y = first_tensor(output)
            self.outputs[i] = y.detach() if (y is not None and self.detach) else y
            return output

        return hook


def _replace_hidden(output: Any, x: Tensor | None) -> Any:
    if x is None:
        raise ValueError("diagnostics: cannot skip a block whose input hidden state was not found")
    if isinstance(output, Tensor):
        return x
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return (x, *output[1:])
    if isinstance(output, list) and output and isinstance(output[0], Tensor):
        return [x, *output[1:]]
    raise ValueError(f"diagnostics: cannot skip a block whose output is a {type(output).__name__}")


class Moments:
    """Pooled count / mean / M2 (sum of squared deviations) in float64, merged with Chan et al.'s rule."""

    def __init__(self) -> None:
        self.n = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, values: Tensor) -> None:
        v = values.detach().double().reshape(-1)
        n_b = float(v.numel())
        if n_b == 0:
            return
        mean_b = float(v.mean())
        m2_b = float((v - mean_b).square().sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    @property
    def variance(self) -> float:
        return self.m2 / self.n if self.n > 0 else math.nan


class MeanAcc:
    """Running float64 sums and counts per key; ``value(key) = sum / count``."""

    def __init__(self) -> None:
        self.sums: dict[tuple[Any, ...], float] = {}
        self.counts: dict[tuple[Any, ...], float] = {}

    def add(self, key: tuple[Any, ...], total: float, count: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(total)
        self.counts[key] = self.counts.get(key, 0.0) + float(count)

    def items(self) -> Iterator[tuple[tuple[Any, ...], float, float]]:
        for key, total in self.sums.items():
            c = self.counts[key]
            yield key, (total / c if c > 0 else math.nan), c
