"""``adapt(model, method, **options) -> Adapted``: one entry point for the test-time adaptation methods.

See :mod:`normlab.tta` for the methods, how layers are chosen and how normlab differs from the official codes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from normlab.tta._common import LayerChoice, Patch, logits_of, restore_forward
from normlab.tta.statistics import AlphaBN, RobustBN, TestBatchNorm, UnMixTNS, _Layer, bn_form
from normlab.tta.tent import (
    TENT_DEFAULTS,
    TentBatchStats,
    affine_parameters,
    check_tent_options,
    make_optimizer,
    tent_choices,
    tent_step,
)
from normlab.walk import iter_norms, norm_protocol, spec_of

__all__ = ["METHODS", "METHOD_DEFAULTS", "Adapted", "adapt", "plan"]

#: Every method with its options and their defaults (the official ones; see :mod:`normlab.tta`).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "source": {},
    "tbn": {},
    "alpha_bn": {"alpha": 0.1},
    "tent": dict(TENT_DEFAULTS),
    "unmix_tns": {"num_components": 16, "temperature": 0.07, "alpha_init": 0.5, "batch_size_max": 64, "seed": None},
    "rotta_rbn": {"momentum": 0.05},
}
METHODS: tuple[str, ...] = tuple(METHOD_DEFAULTS)
_STAT_METHODS = ("tbn", "alpha_bn", "unmix_tns", "rotta_rbn")


def _check_method(method: Any) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"adapt: expected method to be one of {', '.join(METHODS)}, got {method!r}")
    return method


def _resolve(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The method's defaults updated with ``options``; unknown options and bad values raise."""
    defaults = METHOD_DEFAULTS[method]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        known = ", ".join(defaults) or "none"
        raise TypeError(f"adapt: method {method!r} got unknown option(s) {', '.join(unknown)}; its options: {known}")
    opts = {**defaults, **options}
    if method == "tent":
        check_tent_options(opts)
    for key in ("alpha", "momentum", "alpha_init"):
        if key in opts and method != "tent":
            v = opts[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{method}: expected {key} in [0, 1], got {v!r}")
    for key in ("num_components", "batch_size_max"):
        if key in opts:
            v = opts[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{method}: expected {key} to be an int >= 1, got {v!r}")
    if "temperature" in opts and not (isinstance(opts["temperature"], (int, float)) and opts["temperature"] > 0):
        raise ValueError(f"{method}: expected temperature > 0, got {opts['temperature']!r}")
    if method == "unmix_tns" and opts["num_components"] > 1 and opts["alpha_init"] >= 1.0:
        raise ValueError(f"unmix_tns: expected alpha_init < 1 with num_components > 1 (component variance "
                         f"(1 - alpha_init)·σ²), got {opts['alpha_init']!r}")
    seed = opts.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{method}: expected seed to be an int or None, got {type(seed).__name__}")
    return opts


_DETAIL = {
    "tbn": "training-mode forward: test-batch statistics (running statistics updated as in training, unused)",
    "alpha_bn": "(1 - {alpha})·source + {alpha}·test statistics (unbiased test variance)",
    "unmix_tns": "{num_components} statistic components, instance un-mixing (temperature {temperature})",
    "rotta_rbn": "EMA of the batch statistics from the source ones (momentum {momentum}), normalizes with it",
}


def _stat_choice(name: str, module: nn.Module, batch_dependent: bool, method: str, opts: dict[str, Any]) -> str:
    """Why ``method`` skips this norm, or ``""`` when it adapts it."""
    if not batch_dependent:
        return "per-sample statistics (not batch-dependent): nothing to re-estimate from a test batch"
    try:
        has_stats = norm_protocol(module).recalibration_plan() is not None
    except NotImplementedError as exc:
        return f"running statistics without a recalibration rule ({exc})"
    if not has_stats:
        return "no running statistics (track_running_stats=False): it normalizes with batch statistics already"
    if method == "tbn":
        return ""
    return bn_form(module)[1]


def plan(model: nn.Module, method: str, **options: Any) -> list[LayerChoice]:
    """What ``adapt(model, method, **options)`` would do with every norm of ``model``, without changing it."""
    method = _check_method(method)
    opts = _resolve(method, options)
    if method == "tent":
        return tent_choices(model)
    out = []
    for name, module, spec in iter_norms(model):
        if method == "source":
            out.append(LayerChoice(name, spec.name, False, "method 'source' adapts nothing"))
            continue
        why = _stat_choice(name, module, spec.batch_dependent, method, opts)
        out.append(LayerChoice(name, spec.name, not why, why or _DETAIL[method].format(**opts)))
    return out


def _nothing_to_adapt(model: nn.Module, method: str, choices: list[LayerChoice]) -> ValueError:
    cls = type(model).__name__
    if not choices:
        return ValueError(f"{method}: {cls} has no norms (normlab.iter_norms found none), so there is nothing to adapt")
    what = "norm with an affine parameter (weight/bias) to train" if method == "tent" else "norm it can adapt"
    listing = "; ".join(str(c) for c in choices)
    return ValueError(f"{method}: {cls} has no {what}; its norms: {listing}")


def _layer(method: str, name: str, module: nn.Module, opts: dict[str, Any],
           generator: torch.Generator | None) -> _Layer:
    if method == "tbn":
        return TestBatchNorm(name, module)
    if method == "alpha_bn":
        return AlphaBN(name, module, float(opts["alpha"]))
    if method == "rotta_rbn":
        return RobustBN(name, module, float(opts["momentum"]))
    return UnMixTNS(name, module, num_components=opts["num_components"], temperature=float(opts["temperature"]),
                    alpha_init=float(opts["alpha_init"]), batch_size_max=opts["batch_size_max"], generator=generator)


def adapt(
    model: nn.Module,
    method: str,
    *,
    inplace: bool = False,
    logits: Callable[[Any], Tensor] | None = None,
    **options: Any,
) -> Adapted:
    """Prepare ``model`` for test-time adaptation with ``method``; call the result on test batches.

    Args:
        model: the source model (left unchanged unless ``inplace``).
        method: ``"source"``, ``"tbn"``, ``"alpha_bn"``, ``"tent"``, ``"unmix_tns"`` or ``"rotta_rbn"``.
        inplace: adapt ``model`` itself instead of a deep copy.
        logits: ``f(model output) -> logits``; default: the output if a tensor, else its ``.logits``, its
            ``["logits"]`` or its first element.
        **options: the method's options (:data:`METHOD_DEFAULTS`): ``alpha`` (α-BN, weight of the test statistics,
            0.1); ``momentum`` (RBN, 0.05); ``num_components``, ``temperature``, ``alpha_init``, ``batch_size_max``,
            ``seed`` (UnMix-TNS: 16, 0.07, 0.5, 64, None = the global RNG); ``optimizer`` (``"adam"``, ``"sgd"`` or a
            callable ``params -> Optimizer``), ``lr``, ``betas``, ``momentum``, ``dampening``, ``nesterov``,
            ``weight_decay``, ``steps``, ``episodic``, ``model_train`` (Tent: official defaults; ``model_train=True``
            puts the whole model in training mode as the official code does, dropout included).

    Raises:
        ValueError: an unknown method, a bad option value, or nothing in ``model`` the method can adapt (the
            message lists the model's norms and why each was skipped).
        TypeError: an unknown option.

    Example:
        >>> from normlab.models import DigitsCNN, CNNConfig
        >>> tta = adapt(DigitsCNN(CNNConfig(channels=[4, 4])), "tbn")
        >>> tta(torch.rand(8, 1, 8, 8)).shape
        torch.Size([8, 10])
        >>> tta.adapted
        ['norms.0', 'norms.1']
    """
    method = _check_method(method)
    if not isinstance(model, nn.Module):
        raise TypeError(f"adapt: expected model to be a torch.nn.Module, got {type(model).__name__}")
    opts = _resolve(method, options)
    choices = plan(model, method, **opts)
    if method != "source" and not any(c.adapted for c in choices):
        raise _nothing_to_adapt(model, method, choices)
    if method == "tent" and not any(_affine_of(model, c) for c in choices):
        raise _nothing_to_adapt(model, method, choices)
    target = model if inplace else copy.deepcopy(model)
    return Adapted(target, method, opts, choices, logits or logits_of)


def _affine_of(model: nn.Module, choice: LayerChoice) -> list[nn.Parameter]:
    module = model.get_submodule(choice.name) if choice.name else model
    return [p for _, p in affine_parameters(module)]


class Adapted:
    """A model under test-time adaptation: call it on test batches (``adapted(x)`` or ``adapted.step(x)``) to get the
    predictions (logits) and adapt it online.

    Attributes:
        model: the adapted model (a deep copy of the caller's unless ``inplace=True``).
        method: the method's name.
        options: the resolved options (defaults filled in).
        report: a :class:`~normlab.tta._common.LayerChoice` per norm of the model: adapted or skipped, and why.
        optimizer: Tent's optimizer (``None`` for the other methods).
    """

    def __init__(self, model: nn.Module, method: str, options: dict[str, Any], choices: list[LayerChoice],
                 logits_fn: Callable[[Any], Tensor]) -> None:
        self.model, self.method, self.options = model, method, options
        self.report = tuple(choices)
        self._logits = logits_fn
        self._train_model = method == "tent" and bool(options["model_train"])
        self._modes = [(m, m.training) for m in model.modules()]
        self._grads = [(p, p.requires_grad) for p in model.parameters()]
        self.layers: dict[str, _Layer] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        generator = torch.Generator().manual_seed(options["seed"]) if options.get("seed") is not None else None
        modules = dict(model.named_modules())
        for c in choices:
            module = modules[c.name]
            if method == "tent":
                if not spec_batch_dependent(module):
                    continue
                layer: _Layer = TentBatchStats(c.name, module)
            elif c.adapted:
                layer = _layer(method, c.name, module, options, generator)
            else:
                continue
            self.layers[c.name] = layer
            Patch.install(module, layer)
        if method == "tent":
            model.requires_grad_(False)
            params = [p for c in choices for p in _affine_of(model, c)]
            for p in params:
                p.requires_grad_(True)
            self.optimizer = make_optimizer(params, options)
        model.train(self._train_model)
        self._source = _snapshot(model)
        self._optimizer_state = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None

    @property
    def adapted(self) -> list[str]:
        """Names of the norms the method adapts."""
        return [c.name for c in self.report if c.adapted]

    @property
    def skipped(self) -> dict[str, str]:
        """Names of the norms the method leaves alone, with the reason."""
        return {c.name: c.detail for c in self.report if not c.adapted}

    def step(self, *args: Any, **kwargs: Any) -> Tensor:
        """Predict a test batch (the model's logits) and adapt on it: the arguments go to the model's forward."""
        _check_batch(self.method, args, kwargs)
        self.model.train(self._train_model)
        if self.method == "tent":
            assert self.optimizer is not None
            if self.options["episodic"]:
                self.reset()
            return tent_step(self.model, self.optimizer, self.options["steps"], self._logits, args, kwargs)
        with torch.no_grad():
            return self._logits(self.model(*args, **kwargs))

    __call__ = step

    def reset(self) -> None:
        """Back to the source state: parameters, buffers, the methods' own state and the optimizer's state."""
        with torch.no_grad():
            for t, saved in self._source:
                t.copy_(saved)
        for layer in self.layers.values():
            layer.reset()
        if self.optimizer is not None and self._optimizer_state is not None:
            self.optimizer.state.clear()
            self.optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))

    def remove(self) -> nn.Module:
        """Reset, then undo the adaptation: the norms' own forwards, training modes and ``requires_grad`` flags as
        they were at :func:`adapt` time. Returns the model (the caller's own with ``inplace=True``)."""
        self.reset()
        for name in self.layers:
            restore_forward(self.model.get_submodule(name) if name else self.model)
        for m, mode in self._modes:
            m.training = mode
        for p, flag in self._grads:
            p.requires_grad_(flag)
        self.layers = {}
        return self.model

    def layer_state(self, name: str) -> dict[str, Tensor]:
        """The method's own state of an adapted norm (UnMix-TNS: ``mean_components``, ``var_components``)."""
        if name not in self.layers:
            raise KeyError(f"Adapted.layer_state: {name!r} is not an adapted layer; adapted: {self.adapted}")
        return self.layers[name].state()

    def summary(self) -> str:
        """One line per norm: adapted or skipped, and why."""
        return "\n".join([f"{self.method}: {len(self.adapted)} of {len(self.report)} norms adapted"]
                         + [f"  {c}" for c in self.report])

    def __repr__(self) -> str:
        return f"Adapted(method={self.method!r}, adapted={self.adapted}, skipped={list(self.skipped)})"


def spec_batch_dependent(module: nn.Module) -> bool:
    spec = spec_of(module)
    return spec is not None and spec.batch_dependent


def _snapshot(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    tensors = [p for _, p in model.named_parameters()] + [b for _, b in model.named_buffers()]
    return [(t, t.detach().clone()) for t in tensors]


def _check_batch(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    x = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
    if x is None:
        raise TypeError(f"{method}: expected a test batch (a tensor argument for the model), got none")
    if x.dim() == 0 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{method}: expected a non-empty batch, got input of size {list(x.shape)}")
