"""Lab tasks under distribution shift, on scikit-learn's digits enlarged to 16 × 16 RGB and corrupted as CIFAR-10-C
(:func:`normlab.data.shifted.load_shifted_digits`).

* ``tta``: train a source :class:`~normlab.models.DigitsCNN` on clean digits, then, at the last step, adapt it on
  corrupted test streams with every method of :func:`normlab.tta.adapt` (Wang et al., Tent, ICLR 2021,
  https://arxiv.org/abs/2006.10726, §4: online, each batch predicted once). The grid is severities × label orders
  (i.i.d. or the NOTE / UnMix-TNS Dirichlet order with δ) × test batch sizes, each a *continual* stream over the
  corruptions. Eval metrics: ``err_<method>_<labels>_b<batch>_s<severity>`` (mean error % over the corruptions)
  and the same with ``_<corruption>`` appended, plus ``layers_<method>`` (how many layers the method adapts in
  this net: 0 means the method has nothing to adapt and it has no error rows).
* ``federated``: FedAvg (McMahan et al., AISTATS 2017, https://arxiv.org/abs/1602.05629) over one client per
  corruption domain of the *training* digits, ``local_steps`` local steps per round. ``local_norms = true`` keeps
  every norm's parameters and statistics local (FedBN, Li et al., ICLR 2021, https://arxiv.org/abs/2102.07623);
  ``agc_clip > 0`` clips each client's gradients unit-wise (AGC, Brock et al. 2021) as FedWon does with a
  norm-free Scaled-WS net (Zhuang & Lyu, ICLR 2024, https://arxiv.org/abs/2306.05879). Evaluation: client ``k``
  on the test images of its own domain (after aggregation, so with FedAvg every client is the global model);
  metrics ``acc_<corruption>``, ``acc_mean``, ``val_acc`` (= ``acc_mean``) and ``val_loss``.

The protocol (corruptions, severities, grid, clients) lives in the suite's ``[model]`` table next to the net's own
settings, so that ``--scale`` presets can trim or grow it; it is suite-wide (an arm may not change it).
Each client's Adam state persists across rounds (a local optimizer per client); only weights are aggregated.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.data.shifted import REQUIREMENTS as SHIFT_REQUIREMENTS
from normlab.lab.tasks import Batch, Task
from normlab.models.cnn import CNNConfig
from normlab.models.resnet import ResNetConfig

__all__ = ["FedClients", "FedConfig", "FederatedTask", "ShiftCNNConfig", "TTATask", "fedavg_", "label_tag"]

DEFAULT_CORRUPTIONS = ["gaussian_noise", "defocus_blur", "contrast", "jpeg_compression"]
TTA_METHODS = ("source", "tbn", "alpha_bn", "tent", "unmix_tns", "rotta_rbn")


def label_tag(spec: str) -> str:
    """``"iid"`` -> ``"iid"``, ``"dirichlet:0.1"`` -> ``"dir0.1"`` (the label order's part of a metric name)."""
    return "iid" if spec == "iid" else "dir" + spec.split(":", 1)[1]


def _check_list(owner: str, name: str, value: Any, ok: Any, expected: str) -> None:
    if not isinstance(value, list) or not value or not all(ok(v) for v in value):
        raise ValueError(f"{owner}: expected {name} to be a non-empty list of {expected}, got {value!r}")


def _check_corruptions(owner: str, corruptions: Any) -> None:
    from normlab.data.corruptions import CORRUPTIONS

    _check_list(owner, "corruptions", corruptions, lambda c: c in CORRUPTIONS, f"names from {list(CORRUPTIONS)}")


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _label_ok(spec: Any) -> bool:
    if spec == "iid":
        return True
    if not isinstance(spec, str) or not spec.startswith("dirichlet:"):
        return False
    try:
        return float(spec.split(":", 1)[1]) > 0
    except ValueError:
        return False


@dataclass
class ShiftCNNConfig(CNNConfig):
    """:class:`~normlab.models.cnn.CNNConfig` (``in_channels`` 3) plus the ``tta`` protocol.

    Args:
        size: image side (digits enlarged bilinearly).
        corruptions: the continual stream's domains, in order.
        severities: each a separate stream.
        label_orders: ``"iid"`` or ``"dirichlet:<δ>"``.
        test_batch_sizes: batch sizes of the test streams.
        methods: :data:`normlab.tta.METHODS` to compare.
    """

    in_channels: int = 3
    size: int = 16
    corruptions: list[str] = field(default_factory=lambda: list(DEFAULT_CORRUPTIONS))
    severities: list[int] = field(default_factory=lambda: [5, 3])
    label_orders: list[str] = field(default_factory=lambda: ["iid", "dirichlet:0.1", "dirichlet:0.01"])
    test_batch_sizes: list[int] = field(default_factory=lambda: [64, 16])
    methods: list[str] = field(default_factory=lambda: list(TTA_METHODS))

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = "ShiftCNNConfig"
        if not _is_int(self.size, 8, 64):
            raise ValueError(f"{owner}: expected size to be an int in 8..64, got {self.size!r}")
        _check_corruptions(owner, self.corruptions)
        _check_list(owner, "severities", self.severities, lambda s: _is_int(s, 1, 5), "ints in 1..5")
        _check_list(owner, "label_orders", self.label_orders, _label_ok, "'iid' or 'dirichlet:<delta > 0>'")
        _check_list(owner, "test_batch_sizes", self.test_batch_sizes, lambda b: _is_int(b, 1, 10**6), "ints >= 1")
        _check_list(owner, "methods", self.methods, lambda m: m in TTA_METHODS, f"names from {list(TTA_METHODS)}")

    def net(self) -> CNNConfig:
        names = {f.name for f in dataclasses.fields(CNNConfig)}
        return CNNConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclass
class FedConfig(ResNetConfig):
    """:class:`~normlab.models.resnet.ResNetConfig` plus the ``federated`` protocol.

    Args:
        size: image side.
        corruptions: one client per corruption (its training images corrupted at ``severity``).
        severity: 1..5.
        local_steps: local optimizer steps per round (the suite's ``steps`` must be a multiple).
        local_norms: keep the norms' parameters and statistics local (FedBN).
        agc_clip: AGC clipping λ of every client's gradients (0 = off).
    """

    depth: int = 8
    width: int = 8
    size: int = 16
    corruptions: list[str] = field(default_factory=lambda: list(DEFAULT_CORRUPTIONS))
    severity: int = 3
    local_steps: int = 5
    local_norms: bool = False
    agc_clip: float = 0.0

    def __post_init__(self) -> None:
        if self.variant != "standard" and self.norm == "none":  # TOML has no null: "none" is no norm slot at all
            self.norm = None
        super().__post_init__()
        owner = "FedConfig"
        if not _is_int(self.size, 8, 64):
            raise ValueError(f"{owner}: expected size to be an int in 8..64, got {self.size!r}")
        _check_corruptions(owner, self.corruptions)
        if not _is_int(self.severity, 1, 5):
            raise ValueError(f"{owner}: expected severity to be an int in 1..5, got {self.severity!r}")
        if not _is_int(self.local_steps, 1, 10**6):
            raise ValueError(f"{owner}: expected local_steps to be an int >= 1, got {self.local_steps!r}")
        if not isinstance(self.local_norms, bool):
            raise TypeError(f"{owner}: expected local_norms to be a bool, got {type(self.local_norms).__name__}")
        if isinstance(self.agc_clip, bool) or not isinstance(self.agc_clip, (int, float)) or self.agc_clip < 0:
            raise ValueError(f"{owner}: expected agc_clip to be a number >= 0, got {self.agc_clip!r}")

    def net(self) -> ResNetConfig:
        names = {f.name for f in dataclasses.fields(ResNetConfig)}
        return ResNetConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


_TTA_PROTOCOL = ("size", "corruptions", "severities", "label_orders", "test_batch_sizes", "methods")
_FED_PROTOCOL = ("size", "corruptions", "severity", "local_steps")


@functools.lru_cache(maxsize=4)
def _shifted(size: int, corruptions: tuple[str, ...], severities: tuple[int, ...]) -> Any:
    from normlab.data.shifted import load_shifted_digits

    return load_shifted_digits(size=size, channels=3, corruptions=list(corruptions), severities=list(severities))


def _float(x: Tensor) -> Tensor:
    return x.float() / 255.0


class _ShiftTask(Task):
    """What ``tta`` and ``federated`` share: a suite-wide protocol read from the model table."""

    unit = "samples/s"
    requirements = SHIFT_REQUIREMENTS
    independent_model_keys = ("norm",)
    protocol_keys: tuple[str, ...] = ()

    @classmethod
    def protocol(cls, cfg: Any) -> Any:
        return cls.model_config_class().from_dict({**cls.model_defaults(cfg), **cfg.model})

    @classmethod
    def valid_protocol(cls, cfg: Any) -> Any | None:
        """:meth:`protocol`, or ``None`` where the suite's model table is invalid (reported elsewhere)."""
        try:
            return cls.protocol(cfg)
        except (TypeError, ValueError):
            return None

    @classmethod
    def claim_metrics(cls, cfg: Any) -> tuple[str, ...]:
        p = cls.valid_protocol(cfg)
        return cls.eval_metrics if p is None else (*cls.eval_metrics, *cls.protocol_metrics(p))

    @classmethod
    def protocol_metrics(cls, p: Any) -> list[str]:  # pragma: no cover - abstract
        """The eval metrics the protocol ``p`` adds to :attr:`eval_metrics`."""
        raise NotImplementedError

    @classmethod
    def arm_problems(cls, cfg: Any, model_cfg: Any) -> list[str]:
        base = cls.valid_protocol(cfg)
        if base is None:
            return []  # the base table's own problems are reported elsewhere
        return [f"{k}: the protocol is suite-wide; set it in [model], not in an arm (arm {getattr(model_cfg, k)!r}, "
                f"suite {getattr(base, k)!r})" for k in cls.protocol_keys if getattr(model_cfg, k) != getattr(base, k)]

    def units(self, batch: Batch) -> int:
        return int(batch["x"].numel() // (batch["x"].shape[-1] * batch["x"].shape[-2] * batch["x"].shape[-3]))


class TTATask(_ShiftTask):
    """Source training on clean digits; the TTA grid at the last step (see the module docstring)."""

    protocol_keys = _TTA_PROTOCOL
    config_class = ShiftCNNConfig

    def __init__(self, cfg: Any, dist: Any, device: torch.device) -> None:
        super().__init__(cfg, dist, device)
        self.proto = self.protocol(cfg)
        self.data = _shifted(self.proto.size, tuple(self.proto.corruptions), tuple(self.proto.severities))
        self.x_train, self.x_test = _float(self.data.x_train), _float(self.data.x_test)

    @classmethod
    def protocol_metrics(cls, p: Any) -> list[str]:
        names = [f"layers_{m}" for m in p.methods]
        for m in p.methods:
            for s in p.severities:
                for lab in p.label_orders:
                    for b in p.test_batch_sizes:
                        base = f"err_{m}_{label_tag(lab)}_b{b}_s{s}"
                        names += [base] + [f"{base}_{c}" for c in p.corruptions]
        return names

    @classmethod
    def build(cls, model_cfg: Any) -> nn.Module:
        from normlab.models.cnn import DigitsCNN

        return DigitsCNN(model_cfg.net())

    @classmethod
    def smoke_batch(cls, cfg: Any, model_cfg: Any) -> Batch:
        s = model_cfg.size
        return {"x": torch.rand(2, model_cfg.in_channels, s, s), "labels": torch.tensor([0, 1])}

    eval_metrics = ("val_loss", "val_acc")

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        return self._draw(rng, batch_size, self.x_train, self.data.y_train)

    def _eval_batches(self) -> list[Batch]:
        bs = self.cfg.eval_batch_size
        x, y = self.x_test, self.data.y_test
        return [{"x": x[i : i + bs].to(self.device), "labels": y[i : i + bs].to(self.device)}
                for i in range(0, len(x), bs)]

    def diagnostics_batch(self) -> Batch:
        return self._eval_batches()[0]

    def final_evaluate(self, model: nn.Module) -> dict[str, float]:
        """The TTA grid on the trained source ``model`` (left unchanged: every method adapts a copy)."""
        from normlab.data.streams import make_stream
        from normlab.tta import adapt, run_stream

        p, out = self.proto, {}
        usable = {}
        for m in p.methods:
            try:
                options: dict[str, Any] = {"seed": 0} if m == "unmix_tns" else {}
                usable[m] = adapt(model, m, **options)
                out[f"layers_{m}"] = float(len(usable[m].adapted)) if m != "source" else 0.0
            except ValueError:  # nothing in this net for the method to adapt: no error rows
                out[f"layers_{m}"] = 0.0
        for s in p.severities:
            domains = {c: (_float(self.data.domains[c, s][0]), self.data.domains[c, s][1]) for c in p.corruptions}
            for lab in p.label_orders:
                delta = None if lab == "iid" else float(lab.split(":", 1)[1])
                for b in p.test_batch_sizes:
                    stream = make_stream(domains, batch_size=b, order="continual", seed=0,
                                         labels="iid" if delta is None else "dirichlet", delta=delta)
                    for m, adapted in usable.items():
                        result = run_stream(adapted, stream)
                        base = f"err_{m}_{label_tag(lab)}_b{b}_s{s}"
                        out[base] = result.mean_error()
                        out.update({f"{base}_{c}": e for c, e in result.errors().items()})
        return out


# -- federated --------------------------------------------------------------------------------------------------


class FedClients(nn.Module):
    """``K`` copies of one net (identical at construction), client ``k`` training on domain ``k``.

    ``local`` names the state-dict entries that stay on their client (FedBN: every norm's parameters and buffers);
    :func:`fedavg_` averages the rest. ``forward(x, labels)`` takes ``x`` of shape ``(K, B, C, H, W)``: client
    ``k`` sees ``x[k]``; the loss is the *mean* of the client losses (comparable with one client's validation
    loss), so client ``k``'s gradient is its own divided by ``K``: :meth:`FederatedTask.before_step` multiplies
    it back before AGC and the optimizer step.
    """

    def __init__(self, net: nn.Module, num_clients: int, local_norms: bool = False) -> None:
        super().__init__()
        import copy

        from normlab.registry import list_norms

        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"FedClients: expected num_clients to be an int >= 1, got {num_clients!r}")
        self.clients = nn.ModuleList([net] + [copy.deepcopy(net) for _ in range(num_clients - 1)])
        norm_types = tuple(spec.cls for spec in list_norms())
        norm_modules = [n for n, m in net.named_modules() if isinstance(m, norm_types) and n]
        self.local: set[str] = set()
        if local_norms:
            self.local = {k for k in net.state_dict() if any(k.startswith(n + ".") for n in norm_modules)}

    def forward(self, x: Tensor, labels: Tensor) -> Any:
        from normlab.models.transformer import ModelOutput

        if x.dim() < 2 or x.shape[0] != len(self.clients):
            raise ValueError(f"FedClients: expected x of shape (K={len(self.clients)}, B, ...), got "
                             f"{tuple(x.shape)}")
        outs = [c(x[k], labels=labels[k]) for k, c in enumerate(self.clients)]
        loss = torch.stack([o.loss for o in outs]).mean()
        return ModelOutput(logits=torch.stack([o.logits for o in outs]), loss=loss, hidden_states=None)


@torch.no_grad()
def fedavg_(fed: FedClients, weights: list[float] | None = None) -> None:
    """Set every shared (non-``local``) state-dict entry of every client to the clients' weighted mean (FedAvg;
    equal weights by default, as every client here holds the same number of samples). Integer buffers
    (BatchNorm's step counter) take the rounded mean."""
    k = len(fed.clients)
    w = torch.tensor(weights if weights is not None else [1.0 / k] * k, dtype=torch.float64)
    states = [c.state_dict() for c in fed.clients]
    for name in states[0]:
        if name in fed.local:
            continue
        stacked = torch.stack([s[name].double() for s in states])
        mean = (w.view(-1, *[1] * (stacked.dim() - 1)) * stacked).sum(0)
        for s in states:
            s[name].copy_(mean.round() if not s[name].is_floating_point() else mean)


class FederatedTask(_ShiftTask):
    """FedAvg / FedBN / FedWon over corruption-domain clients (see the module docstring)."""

    protocol_keys = _FED_PROTOCOL
    config_class = FedConfig
    eval_metrics = ("val_loss", "val_acc")

    def __init__(self, cfg: Any, dist: Any, device: torch.device) -> None:
        super().__init__(cfg, dist, device)
        from normlab.data.corruptions import corrupt

        p = self.proto = self.protocol(cfg)
        self.data = _shifted(p.size, tuple(p.corruptions), (p.severity,))
        self.train_x = [_float(corrupt(self.data.x_train, c, p.severity, seed=1)) for c in p.corruptions]
        self.test_x = [_float(self.data.domains[c, p.severity][0]) for c in p.corruptions]

    @classmethod
    def protocol_metrics(cls, p: Any) -> list[str]:
        return ["acc_mean", *[f"acc_{c}" for c in p.corruptions]]

    @classmethod
    def suite_problems(cls, cfg: Any) -> list[str]:
        p = cls.valid_protocol(cfg)
        if p is not None and cfg.steps % p.local_steps:
            return [f"steps: expected a multiple of local_steps={p.local_steps} (whole rounds), got {cfg.steps}"]
        return []

    @classmethod
    def build(cls, model_cfg: Any) -> nn.Module:
        from normlab.models.resnet import ResNet

        fed = FedClients(ResNet(model_cfg.net()), len(model_cfg.corruptions), model_cfg.local_norms)
        fed.agc_clip = float(model_cfg.agc_clip)  # type: ignore[assignment]
        fed.local_steps = int(model_cfg.local_steps)  # type: ignore[assignment]
        return fed

    @classmethod
    def smoke_batch(cls, cfg: Any, model_cfg: Any) -> Batch:
        k, s = len(model_cfg.corruptions), model_cfg.size
        return {"x": torch.rand(k, 2, model_cfg.in_channels, s, s), "labels": torch.zeros(k, 2, dtype=torch.long)}

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        n = len(self.data.y_train)
        idx = [torch.from_numpy(rng.integers(0, n, size=batch_size)) for _ in self.train_x]
        x = torch.stack([xs[i] for xs, i in zip(self.train_x, idx)])
        y = torch.stack([self.data.y_train[i] for i in idx])
        return {"x": x.to(self.device), "labels": y.to(self.device)}

    def before_step(self, model: nn.Module, step: int) -> None:
        """Restore each client's own gradient (the loss is the clients' mean), then AGC on every client's gradients
        (FedWon), before the optimizer step."""
        from normlab.weight import agc_parameters, clip_grad_agc_

        if not isinstance(model, FedClients):
            return
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(len(model.clients))
        clip = float(getattr(model, "agc_clip", 0.0))
        if clip > 0:
            for client in model.clients:
                clip_grad_agc_(agc_parameters(client), clipping=clip)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Aggregate at the end of every round (``step`` is the 1-based count of steps done)."""
        if isinstance(model, FedClients) and step % int(getattr(model, "local_steps", 1)) == 0:
            fedavg_(model)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not isinstance(model, FedClients):
            raise TypeError(f"FederatedTask.evaluate: expected a FedClients model, got {type(model).__name__}")
        was_training = model.training
        model.eval()
        out, losses = {}, []
        bs, y = self.cfg.eval_batch_size, self.data.y_test
        try:
            for c, client, x in zip(self.proto.corruptions, model.clients, self.test_x):
                logits = torch.cat([client(x[i : i + bs].to(self.device)).logits for i in range(0, len(x), bs)])
                losses.append(float(F.cross_entropy(logits, y.to(self.device))))
                out[f"acc_{c}"] = float((logits.argmax(-1).cpu() == y).double().mean())
        finally:
            model.train(was_training)
        accs = [out[f"acc_{c}"] for c in self.proto.corruptions]
        out["acc_mean"] = out["val_acc"] = sum(accs) / len(accs)
        out["val_loss"] = sum(losses) / len(losses)
        return out

    def diagnostics_batch(self) -> Batch:
        return self.sample(np.random.default_rng(0), 4)
