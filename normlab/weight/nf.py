"""Normalizer-free residual blocks of Brock, De, Smith, "Characterizing signal propagation to close the performance
gap in unnormalized ResNets" (ICLR 2021), https://arxiv.org/abs/2101.08692, §4 (NF-ResNets).

``h_{i+1} = h_i + α · s_i · f_i(h_i / β_i)``: ``β_i = sqrt(E[Var h_i])`` is the *expected* (analytic) std of the
block input, ``α`` (0.2) the rate at which the variance grows (``Var h_{i+1} = Var h_i + α²``), ``s_i`` a learnable
scalar started at 0 (SkipInit, De & Smith 2020), and ``f_i`` a chain of gain-corrected activations and Scaled-WS
convs that keeps unit variance. A block whose shortcut is a conv (stride or width change) takes the shortcut on
the activated, β-scaled input, so the expected variance restarts at 1 (then ``1 + α²`` after the block).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.weight.standardize import ScaledStdConv2d

__all__ = ["NONLINEARITY_GAINS", "NFBasicBlock", "ScaledActivation", "nf_expected_stds"]

# γ = 1/std(act(z)), z ~ N(0, 1), as measured numerically in DeepMind's NFNet code (not the analytic values:
# relu's analytic sqrt(2/(1-1/π)) = 1.7128).
NONLINEARITY_GAINS: dict[str, float] = {
    "identity": 1.0,
    "relu": 1.7139588594436646,
    "gelu": 1.7015043497085571,
    "silu": 1.7881293296813965,
    "elu": 1.2716004848,
    "leaky_relu": 1.7059034109,
    "tanh": 1.5939117670,
    "sigmoid": 4.8038353920,
    "softplus": 1.9203323126,
}

_ACTIVATIONS = {
    "identity": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
}


class ScaledActivation(nn.Module):
    """``act(x) · γ_act`` with γ from :data:`NONLINEARITY_GAINS`, so a unit Gaussian input keeps unit variance.

    Args:
        name: one of :data:`NONLINEARITY_GAINS`.
    """

    def __init__(self, name: str = "relu") -> None:
        super().__init__()
        if name not in NONLINEARITY_GAINS:
            raise ValueError(f"ScaledActivation: expected name to be one of {sorted(NONLINEARITY_GAINS)}, got {name!r}")
        self.name = name
        self.gain = NONLINEARITY_GAINS[name]

    def forward(self, x: Tensor) -> Tensor:
        return _ACTIVATIONS[self.name](x) * self.gain

    def extra_repr(self) -> str:
        return f"{self.name!r}, gain={self.gain}"


def _check_number(fn: str, name: str, value: object, low: float, low_ok: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (value == low and not low_ok):  # type: ignore[operator]
        bound = f">= {low}" if low_ok else f"> {low}"
        raise ValueError(f"{fn}: expected {name} to be a finite number {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


class NFBasicBlock(nn.Module):
    r"""Normalizer-free basic block (two 3×3 Scaled-WS convs), pre-activation as DeepMind's NF-ResNet::

        a = act(x) / expected_std
        shortcut = conv_shortcut(a) if stride != 1 or widths differ else x
        y = shortcut + alpha * skip_gain * conv2(act(conv1(a)))

    Paper: Brock, De, Smith, https://arxiv.org/abs/2101.08692 (§4).

    Args:
        in_channels, out_channels: channels; ``stride`` applies to ``conv1`` and the shortcut.
        alpha: variance growth per block α. Default 0.2.
        expected_std: β, the analytic std of the block's input (see :func:`nf_expected_stds`). Default 1.
        activation: a key of :data:`NONLINEARITY_GAINS`. Default ``"relu"``.
        skipinit: learn a scalar ``skip_gain`` started at 0 (default ``True``); ``False`` = no such scalar.
        conv_kwargs: keyword arguments of every :class:`ScaledStdConv2d` (``eps``, ``variant``, ...).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        alpha: float = 0.2,
        expected_std: float = 1.0,
        activation: str = "relu",
        skipinit: bool = True,
        conv_kwargs: dict[str, object] | None = None,
    ) -> None:
        super().__init__()
        self.alpha = _check_number("NFBasicBlock", "alpha", alpha, 0.0, low_ok=False)
        self.expected_std = _check_number("NFBasicBlock", "expected_std", expected_std, 0.0, low_ok=False)
        kw = dict(conv_kwargs or {})
        self.act = ScaledActivation(activation)
        self.conv1 = ScaledStdConv2d(in_channels, out_channels, 3, stride=stride, padding=1, **kw)  # type: ignore[arg-type]
        self.conv2 = ScaledStdConv2d(out_channels, out_channels, 3, padding=1, **kw)  # type: ignore[arg-type]
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ScaledStdConv2d(in_channels, out_channels, 1, stride=stride, **kw)  # type: ignore[arg-type]
        self.skip_gain = nn.Parameter(torch.zeros(())) if skipinit else None

    @property
    def resets_variance(self) -> bool:
        """True when the shortcut is a conv: the block's output variance is then ``1 + α²`` whatever came in."""
        return self.shortcut is not None

    def forward(self, x: Tensor) -> Tensor:
        a = self.act(x) / self.expected_std
        shortcut = self.shortcut(a) if self.shortcut is not None else x
        out = self.conv2(self.act(self.conv1(a)))
        if self.skip_gain is not None:
            out = out * self.skip_gain
        return shortcut + self.alpha * out

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, expected_std={self.expected_std:.6g}, skipinit={self.skip_gain is not None}"


def nf_expected_stds(resets: list[bool], alpha: float = 0.2) -> list[float]:
    """β for each block of a chain: ``resets[i]`` says whether block ``i`` has a conv shortcut. The input of the
    first block has variance 1; a block adds α²; a conv-shortcut block restarts at 1 first.

    >>> [round(b, 4) for b in nf_expected_stds([False, False, True, False], alpha=0.2)]
    [1.0, 1.0198, 1.0392, 1.0198]
    """
    alpha = _check_number("nf_expected_stds", "alpha", alpha, 0.0, low_ok=False)
    var, out = 1.0, []
    for reset in resets:
        out.append(math.sqrt(var))
        var = (1.0 if reset else var) + alpha**2
    return out
