"""RMS-family norms: RMSNorm, partial RMSNorm, SRMSNorm, CRMSNorm and ScaleNorm.

* RMSNorm / pRMSNorm: Zhang & Sennrich, NeurIPS 2019, https://arxiv.org/abs/1910.07467
* SRMSNorm (TransNormerLLM's SimpleRMSNorm): Qin et al. 2023, https://arxiv.org/abs/2307.14995
* CRMSNorm: Jiang, Gu, Zhu, Pan, NeurIPS 2023, https://arxiv.org/abs/2305.14858
* ScaleNorm: Nguyen & Salazar 2019, https://arxiv.org/abs/1910.05895
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from normlab.functional.rms_norm import crms_norm, partial_size, resolve_eps, rms_norm, scale_norm
from normlab.kernels._scope import Impl
from normlab.nn._base import NormBase
from normlab.registry import Paper, register_norm

__all__ = ["CRMSNorm", "PartialRMSNorm", "RMSNorm", "SRMSNorm", "ScaleNorm"]

_RMS_PAPER = Paper("Root Mean Square Layer Normalization", "https://arxiv.org/abs/1910.07467")


def _eps_inside(op: str, eps_placement: str) -> bool:
    if eps_placement not in ("inside", "outside"):
        raise ValueError(f"{op}: expected eps_placement in ('inside', 'outside'), got {eps_placement!r}")
    return eps_placement == "inside"


@register_norm(
    "rms_norm", functional=rms_norm, layout="any", aliases=("rms",),
    paper=_RMS_PAPER,
    samples=(
        {"eps_placement": "outside"}, {"bias": True}, {"affine": False}, {"channel_dim": 1}, {"unit_offset": True},
    ),
    description="per-token root mean square; eps inside (default) or outside the root",
)
class RMSNorm(NormBase):
    r"""Root mean square layer normalization.

    Paper: Zhang & Sennrich, "Root Mean Square Layer Normalization", https://arxiv.org/abs/1910.07467.

    .. math:: y = \frac{x}{\sqrt{\tfrac{1}{k}\sum_{i\le k} x_i^2 + \epsilon}} \odot \gamma \;(+\, \beta)

    with ``k = C`` (pRMSNorm: ``k = ceil(p C)``, see :class:`PartialRMSNorm`). The statistic is reduced over the
    channel axis of each token.

    ``eps_placement="inside"`` (default) is the LLaMA / T5 / ``torch.nn.RMSNorm`` convention and the official
    TensorFlow code; ``"outside"`` computes ``x / (rms + eps)`` as the official PyTorch code does, with that
    code's ``eps=1e-8`` as default. The two differ for tiny inputs (``tests/nn/test_vectors.py`` shows one).

    Args:
        num_features: channel count ``C``.
        eps: default ``None``: ``1e-6`` with ``eps_placement="inside"``, ``1e-8`` with ``"outside"``. The
            resolved value is the ``eps`` attribute.
        eps_placement: ``"inside"`` or ``"outside"`` the square root.
        affine: learn the gain ``weight`` (init 1). Default ``True``.
        bias: learn an offset ``bias`` (init 0), as the official code's ``bias=True``. Default ``False``.
        channel_dim: channel axis. Default ``-1``.
        unit_offset: the gain is ``1 + weight`` (``weight`` init 0), Gemma's RMSNorm. Default ``False``.
        impl: ``"auto"`` (default), ``"composite"``, ``"cpu"`` or ``"triton"``: which implementation runs the
            forward (:func:`normlab.kernels.use_impl` sets it for a scope; this argument, unless ``"auto"``, wins).

    Shape:
        input ``(*, C)``; output the same shape and dtype (float16/bfloat16 statistics in float32).

    Example:
        >>> RMSNorm(8)(torch.randn(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(
        self, num_features: int, *, eps: float | None = None, eps_placement: Literal["inside", "outside"] = "inside",
        affine: bool = True, bias: bool = False, channel_dim: int = -1, unit_offset: bool = False,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None, impl: Impl = "auto",
    ) -> None:
        super().__init__(num_features, channel_dim, impl=impl)
        self.unit_offset = unit_offset
        self._eps_inside = _eps_inside(self._name(), eps_placement)
        self.eps = resolve_eps(eps, self._eps_inside)
        self.eps_placement = eps_placement
        self._init_affine(num_features, weight=affine, bias=bias, device=device, dtype=dtype)
        self.reset_parameters()

    repr_always = ("eps",)
    kernel_op = "rms_norm"

    def _param_init(self) -> dict[str, float]:
        return {"weight": 0.0 if self.unit_offset else 1.0, "bias": 0.0}

    @classmethod
    def torch_twin(cls, num_features: int, **kwargs: Any) -> nn.Module | None:
        k = cls.resolved_kwargs(**kwargs)
        if cls is not RMSNorm or k["eps_placement"] != "inside" or k["bias"] or k["channel_dim"] != -1:
            return None
        if k["unit_offset"]:  # torch.nn.RMSNorm has no (1 + weight) gain
            return None
        # eps=None must mean ours (1e-6), not torch's own None (finfo.eps of the input dtype).
        return nn.RMSNorm(num_features, eps=resolve_eps(k["eps"], True), elementwise_affine=k["affine"])

    def _partial(self) -> int | None:
        return None

    def _functional_arg(self, name: str) -> Any:
        if name == "eps_inside":
            return self._eps_inside
        return self._partial() if name == "partial" else super()._functional_arg(name)


@register_norm(
    "prms_norm", functional=rms_norm, layout="any", aliases=("prms", "partial_rms_norm"),
    paper=_RMS_PAPER,
    samples=({"p": 0.5}, {"p": 0.3, "k_rounding": "floor"}, {"eps_placement": "outside"}),
    description="RMSNorm whose RMS is estimated from the first ceil(p*C) channels (p=6.25%)",
)
class PartialRMSNorm(RMSNorm):
    r"""Partial RMSNorm (pRMSNorm): the RMS is estimated from the first ``k`` channels only, then applied to all.

    Paper: Zhang & Sennrich 2019 (§ partial RMSNorm), https://arxiv.org/abs/1910.07467; the paper's
    experiments use ``p = 6.25%``.

    ``k = ceil(p * C)`` by default; ``k_rounding="floor"`` gives the official code's ``int(p * C)`` (which
    selects zero channels, and divides by zero, for small ``p * C``: refused here with a ``ValueError``).

    Args:
        num_features: channel count ``C``.
        p: fraction of leading channels in the estimate, in ``(0, 1]``. Default ``0.0625``.
        k_rounding: ``"ceil"`` (default) or ``"floor"``.
        **kwargs: as :class:`RMSNorm`.

    Example:
        >>> PartialRMSNorm(64, p=0.25).k
        16
    """

    def __init__(self, num_features: int, *, p: float = 0.0625, k_rounding: str = "ceil", **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.p = p
        self.k_rounding = k_rounding
        self.k = partial_size(self.num_features, p, k_rounding)

    def _partial(self) -> int | None:
        return self.k

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


@register_norm(
    "srms_norm", functional=rms_norm, layout="any", aliases=("srms", "simple_rms_norm"),
    paper=Paper(
        "TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer",
        "https://arxiv.org/abs/2307.14995",
    ),
    samples=({"eps_placement": "outside"},),
    description="RMSNorm with no learnable parameters (TransNormerLLM)",
)
class SRMSNorm(RMSNorm):
    r"""Simple RMSNorm: ``x / sqrt(mean(x^2) + eps)`` with no gain or bias (TransNormerLLM).

    Paper: Qin et al. 2023, https://arxiv.org/abs/2307.14995. Default ``eps=1e-6`` inside the root, as the
    lightning-attention code; ``eps_placement="outside"`` (whose default eps is ``1e-8``) is the TransNormer-era
    (fairseq-evo) variant.

    Args:
        num_features: channel count ``C``.
        **kwargs: ``eps``, ``eps_placement``, ``channel_dim`` as :class:`RMSNorm`; ``affine``/``bias`` must stay off.

    Example:
        >>> SRMSNorm(4)(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        tensor([0.3651, 0.7303, 1.0954, 1.4606])
    """

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        for key in ("affine", "bias"):
            if kwargs.get(key):
                raise ValueError(f"srms_norm: has no learnable parameters; expected {key}=False, got {key}=True")
        kwargs["affine"] = False
        kwargs["bias"] = False
        super().__init__(num_features, **kwargs)

    repr_never = ("affine", "bias")


@register_norm(
    "crms_norm", functional=crms_norm, layout="any", aliases=("crms", "compressed_rms_norm"),
    paper=Paper(
        "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN Transformers",
        "https://arxiv.org/abs/2305.14858",
    ),
    samples=({"affine": False}, {"bias": True}),
    description="RMSNorm of a zero-mean vector stored in d-1 coordinates (Pre-CRMSNorm)",
)
class CRMSNorm(NormBase):
    r"""Compressed RMSNorm for a zero-mean vector stored without its last coordinate.

    Paper: Jiang, Gu, Zhu, Pan, NeurIPS 2023, https://arxiv.org/abs/2305.14858.

    A zero-mean ``x`` of width ``d`` is stored as ``z = x[:d-1]``; the dropped coordinate is ``-sum(z)``. Then

    .. math:: \mathrm{CRMSNorm}(z) = \frac{z}{\sqrt{(\sum_i z_i^2 + (\sum_i z_i)^2)/d + \epsilon}}

    equals ``RMSNorm(x)[:d-1]`` = ``LayerNorm(x)[:d-1]`` (eps inside, as LN's).

    Args:
        num_features: the stored width ``d - 1``.
        eps: default ``1e-5`` (LayerNorm's, since it replaces LayerNorm exactly).
        affine: learn a gain ``weight`` of width ``d-1``. Default ``True``.
        bias: learn an offset. Default ``False``.
        channel_dim: default ``-1``.
        impl: implementation, as :class:`RMSNorm`'s.

    Example:
        >>> CRMSNorm(3, affine=False)(torch.tensor([1.0, -2.0, 3.0]))
        tensor([ 0.4714, -0.9428,  1.4142])
    """

    def __init__(
        self, num_features: int, *, eps: float = 1e-5, affine: bool = True, bias: bool = False, channel_dim: int = -1,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None, impl: Impl = "auto",
    ) -> None:
        super().__init__(num_features, channel_dim, impl=impl)
        self.eps = eps
        self._init_affine(num_features, weight=affine, bias=bias, device=device, dtype=dtype)
        self.reset_parameters()

    kernel_op = "crms_norm"


@register_norm(
    "scale_norm", functional=scale_norm, layout="any", aliases=("scalenorm",),
    paper=Paper(
        "Transformers without Tears: Improving the Normalization of Self-Attention", "https://arxiv.org/abs/1910.05895"
    ),
    samples=({"eps": 1e-3},),
    description="x / ||x|| times one learned scalar g (init sqrt(C))",
)
class ScaleNorm(NormBase):
    r"""ScaleNorm: ``g * x / max(||x||_2, eps)`` with a single learned scalar ``g`` (init ``sqrt(C)``).

    Paper: Nguyen & Salazar 2019, https://arxiv.org/abs/1910.05895. The L2 norm is taken over the channel axis.
    ``g`` is the parameter ``weight`` (shape ``(1,)``), the name every norm's gain has; state dicts that call it
    ``scale`` (before ``_version`` 2) still load.

    Args:
        num_features: channel count ``C`` (sets the initial ``g = sqrt(C)``).
        eps: lower clamp of the norm. Default ``1e-5``.
        channel_dim: default ``-1``.
        impl: implementation, as :class:`RMSNorm`'s.

    Example:
        >>> ScaleNorm(4)(torch.ones(4)).detach()
        tensor([1., 1., 1., 1.])
    """

    def __init__(
        self, num_features: int, *, eps: float = 1e-5, channel_dim: int = -1, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None, impl: Impl = "auto",
    ) -> None:
        super().__init__(num_features, channel_dim, impl=impl)
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.reset_parameters()

    kernel_op = "scale_norm"

    # _version 2 renamed the learned scalar g from ``scale`` to ``weight``, the name every other norm uses.
    _version = 2

    def _param_init(self) -> dict[str, float]:
        return {"weight": math.sqrt(self.num_features)}

    def _upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int | None) -> None:
        if (version is None or version < 2) and prefix + "scale" in state_dict and prefix + "weight" not in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "scale")
