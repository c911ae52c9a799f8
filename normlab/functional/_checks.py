"""Input validation and dtype helpers shared by the functional ops.

Error messages name the parameter, what was expected and what was received, in the style of ATen:
"Given num_features=768, expected input with shape [*, 768], but got input of size [2, 5, 512]".
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "affine_in",
    "apply_affine",
    "channel_axis",
    "check_channels",
    "check_float_input",
    "check_no_mask",
    "check_num_groups",
    "compute_dtype",
    "from_compute",
    "shape_pattern",
    "to_compute",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(x: Tensor) -> torch.dtype:
    """Statistics of float16/bfloat16 inputs are computed in float32; other dtypes as they are."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def to_compute(x: Tensor, cd: int, axis: int = -1) -> Tensor:
    """The opening of a functional op: ``x`` in its compute dtype with the channel axis ``cd`` moved to ``axis``."""
    xs = x.to(compute_dtype(x))
    return xs if cd == axis % x.dim() else xs.movedim(cd, axis)


def from_compute(y: Tensor, x: Tensor, cd: int, axis: int = -1) -> Tensor:
    """The closing of a functional op: undo :func:`to_compute` (channel axis back at ``cd``), one rounding to
    ``x.dtype``."""
    return (y if cd == axis % x.dim() else y.movedim(axis, cd)).to(x.dtype)


def affine_in(dtype: torch.dtype, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """``weight`` and ``bias`` cast to the compute dtype (``None`` stays ``None``), for a kernel that applies them."""
    return (None if weight is None else weight.to(dtype)), (None if bias is None else bias.to(dtype))


def apply_affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, cd: int = -1) -> Tensor:
    """``y * weight + bias`` in ``y``'s dtype, each skipped when ``None``; per-channel along axis ``cd`` of ``y``."""
    shape = [1] * y.dim()
    shape[cd] = -1
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(shape)
    return y


def check_float_input(x: object, op: str, param: str = "input") -> Tensor:
    """Raise ``TypeError`` unless ``x`` is a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected {param} to be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{op}: expected a floating-point {param} (float16, bfloat16, float32 or float64), got dtype {x.dtype}"
        )
    return x


def channel_axis(x: Tensor, channel_dim: int, op: str) -> int:
    """Resolve a possibly negative ``channel_dim`` against ``x.dim()`` or raise ``ValueError``."""
    nd = x.dim()
    if nd == 0 or not -nd <= channel_dim < nd:
        raise ValueError(
            f"{op}: channel_dim={channel_dim} is out of range for an input of size {list(x.shape)} ({nd} dims)"
        )
    return channel_dim % nd


def shape_pattern(num_features: int | tuple[int, ...], channel_dim: int) -> str:
    """Readable expected-shape pattern, e.g. ``[*, 768]`` or ``[N, 64, *]``."""
    feats = ", ".join(str(f) for f in (num_features if isinstance(num_features, tuple) else (num_features,)))
    if channel_dim == -1:
        return f"[*, {feats}]"
    if channel_dim >= 0:
        lead = ", ".join(["N"] + [f"D{i}" for i in range(1, channel_dim)]) if channel_dim > 0 else ""
        return f"[{lead + ', ' if lead else ''}{feats}, *]"
    trail = ", ".join(f"D{i}" for i in range(-channel_dim - 1))
    return f"[*, {feats}, {trail}]"


def check_channels(
    x: Tensor, num_features: int | tuple[int, ...], channel_dim: int, op: str, *, min_dim: int = 1
) -> int:
    """Check the input's dtype, rank and channel size; return the non-negative channel axis.

    For a tuple ``num_features`` (LayerNorm's ``normalized_shape``) the trailing dims must match.
    """
    check_float_input(x, op)
    if x.dim() < min_dim:
        raise ValueError(
            f"{op}: expected an input with at least {min_dim} dims, shape {shape_pattern(num_features, channel_dim)}, "
            f"but got input of size {list(x.shape)}"
        )
    if isinstance(num_features, tuple):
        k = len(num_features)
        if tuple(x.shape[-k:]) != num_features or x.dim() < k:
            raise ValueError(
                f"{op}: given normalized_shape={list(num_features)}, expected input with shape "
                f"{shape_pattern(num_features, -1)}, but got input of size {list(x.shape)}"
            )
        return x.dim() - k
    cd = channel_axis(x, channel_dim, op)
    if x.shape[cd] != num_features:
        raise ValueError(
            f"{op}: given num_features={num_features} and channel_dim={channel_dim}, expected input with shape "
            f"{shape_pattern(num_features, channel_dim)}, but got input of size {list(x.shape)}"
        )
    return cd


def check_num_groups(num_groups: object, num_features: int, op: str, features: str = "num_features") -> int:
    """Return ``num_groups`` if it is a positive ``int`` dividing ``num_features``, else raise ``ValueError``
    (``features`` is the caller's name for the channel count)."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or num_features % num_groups:
        raise ValueError(f"{op}: expected num_groups to be a positive divisor of {features}={num_features}, "
                         f"got num_groups={num_groups!r}")
    return num_groups


def check_no_mask(mask: Tensor | None, op: str) -> None:
    """Raise ``ValueError`` for a padding mask given to a norm whose statistics pool over positions."""
    if mask is not None:
        raise ValueError(f"{op}: statistics pool over positions, and padding masks are not supported; expected "
                         f"mask=None, got a mask of size {list(mask.shape)}")
