"""What the model configurations and the image classifiers share: dict round trips of a config dataclass, the
check that a convolutional net's norm works on channel-first tensors, and the input-shape check of an image model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import torch.fx
from torch import Tensor

from normlab.registry import get_norm

__all__ = ["DictConfig", "check_conv_norm", "check_images"]

_C = TypeVar("_C", bound="DictConfig")


class DictConfig:
    """Mixin of a configuration dataclass: :meth:`to_dict` and :meth:`from_dict`, which refuses unknown keys."""

    def to_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict(self)`` (JSON-serialisable when every field is: norm choices given as strings)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
        """Build a config from a dict (e.g. loaded from JSON); unknown keys raise ``ValueError``."""
        name = f"{cls.__name__}.from_dict"
        if not isinstance(data, Mapping):
            raise TypeError(f"{name}: expected a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{name}: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(data))


def check_conv_norm(owner: str, norm: Any, *, optional: bool = False) -> None:
    """Refuse a norm choice a convolutional net cannot use: not a registry key, or a token-only (``(*, C)``) norm."""
    if optional and norm is None:
        return
    if not isinstance(norm, str):
        expected = "a registry key (str) or None" if optional else "a registry key (str)"
        raise TypeError(f"{owner}: expected norm to be {expected}, got {type(norm).__name__}")
    if get_norm(norm).layout == "token":
        raise ValueError(
            f"{owner}: norm {norm!r} works on token tensors (*, C) only; a {owner.removesuffix('Config')} needs a "
            f"norm with layout 'channel_first' or 'any'"
        )


def check_images(owner: str, x: Tensor, in_channels: int) -> None:
    """Refuse an input that is not a batch of images ``[B, in_channels, H, W]``.

    Skipped under ``torch.fx`` symbolic tracing, where shapes are proxies, so that ``fold_norms`` can trace the net.
    """
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{owner}: expected input of shape [B, {in_channels}, H, W], got {list(x.shape)}")
