"""Tiny hand-made models for the diagnostics tests: blocks with known geometry in a ``layers`` ModuleList."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Rotate(nn.Module):
    """Rotates each consecutive channel pair by 90°: the output is orthogonal to the input (angle 0.5)."""

    def forward(self, x: Tensor) -> Tensor:
        pairs = x.view(*x.shape[:-1], -1, 2)
        return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


@dataclass
class ToyOutput:
    loss: Tensor | None
    hidden_states: tuple[Tensor, ...] | None = None


class ToyModel(nn.Module):
    """Embedding -> fixed blocks in ``self.layers`` -> linear head; ``loss`` = mean squared output over valid tokens.

    Blocks return a tuple ``(hidden, None)`` like some Hugging Face layers, when ``tuple_out`` is set.
    """

    def __init__(self, blocks: list[nn.Module], d: int = 4, tuple_out: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, d)
        self.layers = nn.ModuleList(blocks)
        self.head = nn.Linear(d, 1)
        self.tuple_out = tuple_out

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False):
        x = self.embed(input_ids)
        hidden = [x]
        for block in self.layers:
            x = block(x)
            x = x[0] if isinstance(x, tuple) else x
            hidden.append(x)
        y = self.head(x).squeeze(-1)
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(y, dtype=torch.bool)
        loss = y[mask].square().mean()
        return ToyOutput(loss=loss, hidden_states=tuple(hidden) if output_hidden_states else None)


class TupleBlock(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.inner(x), None
