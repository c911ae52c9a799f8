"""What an arm trains on: a :class:`Task` builds the model from a config dict, draws training batches from a seeded
generator, computes the loss and evaluates on a fixed validation set that every arm and seed shares.

* ``lm_stdlib``: byte-level next-token prediction on the Python stdlib source (:mod:`normlab.data.text`) with
  :class:`~normlab.models.DecoderLM`. Validation: ``eval_batches × eval_batch_size`` evenly spaced windows of the
  held-out files. Batch-statistic norms are evaluated in eval mode (running statistics): in a causal LM their
  train-mode batch statistics would mix in future tokens of other sequences.
* ``digits``: 10-way classification of scikit-learn's 8×8 digits with :class:`~normlab.models.DigitsCNN`.
  Validation: the whole held-out split (loss and accuracy).
* ``inpainting``: the Region Normalization generator filling holes in sample-photo crops
  (:mod:`normlab.lab.tasks_inpainting`); validation PSNR and L1 besides the loss.

Under DDP each rank draws its own training stream (the generator is seeded with ``(seed, rank)``) and evaluates a
slice of the validation set; the sums are all-reduced.

A task class also owns what validating a suite of it needs, without loading any data (class methods): its model
config class, the defaults and cross-checks it adds to the model table, a model build and a tiny input for
``--dry-run``, and the optional packages its data loader needs. Nothing outside this module branches on a task name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from normlab._env import Requirement
from normlab.data.images import REQUIREMENTS as IMAGE_REQUIREMENTS
from normlab.lab.dist import DistInfo, all_reduce_sum
from normlab.models import CNNConfig, DecoderLM, DigitsCNN, TransformerConfig

if TYPE_CHECKING:  # config imports this module for the task table
    from normlab.lab.config import SuiteConfig

__all__ = ["TASK_CLASSES", "DigitsTask", "LMTask", "Task", "make_task", "task_class"]

Batch = dict[str, Tensor]


class Task:
    """Interface of a lab task (see the module docstring)."""

    unit = "samples/s"
    eval_metrics: tuple[str, ...] = ("val_loss",)
    higher_is_better: tuple[str, ...] = ("val_acc",)  # eval metrics where larger is better (claims: a diverged seed)
    requirements: tuple[Requirement, ...] = ()  # optional packages its data loader needs (the loader's own list)
    # Model-config fields whose validity does not depend on other fields: validation checks each alone (everything
    # else at its default), so that e.g. an unknown norm and an unknown placement are both reported although the
    # model config's constructor stops at its first error.
    independent_model_keys: tuple[str, ...] = ("norm",)

    def __init__(self, cfg: SuiteConfig, dist: DistInfo, device: torch.device) -> None:
        self.cfg = cfg
        self.dist = dist
        self.device = device

    # The model config dataclass (``from_dict``, ``to_dict``) and the model class that :meth:`build` makes of it.
    config_class: Any = None
    model_class: Any = None

    @classmethod
    def model_config_class(cls) -> Any:
        """The model config dataclass (``from_dict``, ``to_dict``) of the task's model."""
        return cls.config_class

    @classmethod
    def model_defaults(cls, cfg: SuiteConfig) -> dict[str, Any]:
        """Model-config values the task derives from the suite, used where the suite's model table sets none."""
        return {}

    @classmethod
    def suite_problems(cls, cfg: SuiteConfig) -> list[str]:
        """Problems of the suite's settings that only this task has (empty: none)."""
        return []

    @classmethod
    def arm_problems(cls, cfg: SuiteConfig, model_cfg: Any) -> list[str]:
        """Problems of one arm's built model config against the suite's settings (empty: none)."""
        return []

    @classmethod
    def build_model(cls, model_cfg: dict[str, Any]) -> nn.Module:
        """The model of a (resolved) model config dict."""
        return cls.build(cls.model_config_class().from_dict(model_cfg))

    @classmethod
    def build(cls, model_cfg: Any) -> nn.Module:
        """The model of a model config (an instance of :attr:`config_class`); default: :attr:`model_class` of it."""
        return cls.model_class(model_cfg)

    @classmethod
    def smoke_batch(cls, cfg: SuiteConfig, model_cfg: Any) -> Batch:  # pragma: no cover - abstract
        """Two random samples that the model of ``model_cfg`` takes (with labels): ``--dry-run``'s forward."""
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:  # pragma: no cover - abstract
        raise NotImplementedError

    def units(self, batch: Batch) -> int:
        """The throughput units in a training batch; default: its samples (the first tensor's leading size)."""
        return int(next(iter(batch.values())).shape[0])

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(**batch).loss

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (training hook). Default: ``weight_decay`` on matrices except embeddings,
        none on the rest. A task may freeze parameters here (leave them out, ``requires_grad_(False)``) and give a
        group an ``lr_scale`` (its learning rate is the schedule's times it; default 1)."""
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """Called once on the freshly built optimizer (training hook), e.g. to attach gradient clipping hooks.
        Default: nothing."""

    # Optional hooks of the training loop; the defaults do nothing.
    @classmethod
    def claim_metrics(cls, cfg: SuiteConfig) -> tuple[str, ...]:
        """Eval metrics a claim may name (``eval:<name>``) in a suite of this task; default :attr:`eval_metrics`."""
        return cls.eval_metrics

    def before_step(self, model: nn.Module, step: int) -> None:
        """Called after the backward pass and before gradient clipping and the optimizer step."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after the optimizer step; ``step`` counts the steps done (1-based)."""

    def final_evaluate(self, model: nn.Module) -> dict[str, float]:
        """Extra eval metrics computed once, at the last step (after :meth:`evaluate`); default none."""
        return {}

    # This rank's validation batches on the CPU, as the defaults below read them (set by the subclass).
    _val: list[Any]

    def diagnostics_batch(self) -> Batch:
        """The batch the diagnostics run on; default: the first validation batch."""
        return self._to_device(self._val[0])

    def _eval_batches(self) -> list[Batch]:
        """This rank's validation batches on the device; default: those of ``self._val``."""
        return [self._to_device(b) for b in self._val]

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _rank_batches(self, **tensors: Tensor) -> list[Batch]:
        """This rank's slice of the validation ``tensors`` (all of one length), cut into ``eval_batch_size``
        batches keyed by the argument names."""
        mine = {k: t[self.dist.rank :: self.dist.world_size] for k, t in tensors.items()}
        n, bs = len(next(iter(mine.values()))), self.cfg.eval_batch_size
        return [{k: t[i : i + bs] for k, t in mine.items()} for i in range(0, n, bs)]

    def _draw(self, rng: np.random.Generator, batch_size: int, x: Tensor, labels: Tensor) -> Batch:
        """A training batch of ``batch_size`` images ``x`` and their ``labels``, drawn with replacement by ``rng``."""
        idx = torch.from_numpy(rng.integers(0, len(labels), size=batch_size))
        return {"x": x[idx].to(self.device), "labels": labels[idx].to(self.device)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics in eval mode, reduced over ranks; restores the model's train/eval mode."""
        was_training = model.training
        model.eval()
        loss_sum = correct = count = 0.0
        try:
            for batch in self._eval_batches():
                out = model(**batch)
                n = self._eval_count(batch)
                loss_sum += float(out.loss) * n
                count += n
                if "labels" in batch and "val_acc" in self.eval_metrics:
                    correct += float((out.logits.argmax(-1) == batch["labels"]).sum())
        finally:
            model.train(was_training)
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], self.dist, self.device)
        out_metrics = {"val_loss": loss_sum / max(count, 1.0)}
        if "val_acc" in self.eval_metrics:
            out_metrics["val_acc"] = correct / max(count, 1.0)
        return out_metrics

    def _eval_count(self, batch: Batch) -> float:
        return float(next(iter(batch.values())).shape[0])


class LMTask(Task):
    """Byte-level LM on the stdlib corpus."""

    unit = "tokens/s"
    independent_model_keys = ("norm", "placement", "mlp", "qk_norm")
    config_class = TransformerConfig
    model_class = DecoderLM

    def __init__(self, cfg: SuiteConfig, dist: DistInfo, device: torch.device) -> None:
        super().__init__(cfg, dist, device)
        from normlab.data.text import load_stdlib_corpus, strided_windows

        self.corpus = load_stdlib_corpus(val_fraction=cfg.val_fraction)
        total = cfg.eval_batches * cfg.eval_batch_size
        windows = strided_windows(self.corpus.val, cfg.seq_len, total)
        mine = windows[dist.rank :: dist.world_size]  # each rank evaluates its slice
        self._val = [mine[i : i + cfg.eval_batch_size] for i in range(0, len(mine), cfg.eval_batch_size)]
        self._diag = windows[: min(8, total)]


    @classmethod
    def model_defaults(cls, cfg: SuiteConfig) -> dict[str, Any]:
        return {"vocab_size": 256, "max_seq_len": cfg.seq_len}

    @classmethod
    def suite_problems(cls, cfg: SuiteConfig) -> list[str]:
        vocab = cfg.model.get("vocab_size", 256)
        return [] if vocab == 256 else [f"model.vocab_size: the byte-level corpus needs 256, got {vocab!r}"]

    @classmethod
    def arm_problems(cls, cfg: SuiteConfig, model_cfg: Any) -> list[str]:
        if model_cfg.max_seq_len < cfg.seq_len:
            return [f"max_seq_len={model_cfg.max_seq_len} is shorter than seq_len={cfg.seq_len}"]
        return []

    @classmethod
    def smoke_batch(cls, cfg: SuiteConfig, model_cfg: Any) -> Batch:
        ids = torch.randint(0, 256, (2, min(8, cfg.seq_len)))
        return {"input_ids": ids, "labels": ids}

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        from normlab.data.text import random_windows

        ids = random_windows(self.corpus.train, self.cfg.seq_len, batch_size, rng).to(self.device)
        return {"input_ids": ids, "labels": ids}

    def units(self, batch: Batch) -> int:
        return int(batch["input_ids"].numel())

    def _eval_batches(self) -> list[Batch]:
        return [{"input_ids": w.to(self.device), "labels": w.to(self.device)} for w in self._val]

    def _eval_count(self, batch: Batch) -> float:
        # The model's loss is a mean over the (seq_len - 1) predicted positions of every window.
        ids = batch["input_ids"]
        return float(ids.shape[0] * (ids.shape[1] - 1))

    def diagnostics_batch(self) -> Batch:
        ids = self._diag.to(self.device)
        return {"input_ids": ids, "labels": ids}


class DigitsTask(Task):
    """DigitsCNN on scikit-learn's digits."""

    unit = "samples/s"
    eval_metrics = ("val_loss", "val_acc")
    requirements = IMAGE_REQUIREMENTS
    config_class = CNNConfig
    model_class = DigitsCNN

    def __init__(self, cfg: SuiteConfig, dist: DistInfo, device: torch.device) -> None:
        super().__init__(cfg, dist, device)
        from normlab.data.images import load_digits_split

        self.data = load_digits_split(val_fraction=cfg.val_fraction)
        self._val = self._rank_batches(x=self.data.x_val, labels=self.data.y_val)


    @classmethod
    def smoke_batch(cls, cfg: SuiteConfig, model_cfg: Any) -> Batch:
        return {"x": torch.rand(2, model_cfg.in_channels, 8, 8), "labels": torch.tensor([0, 1])}

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        return self._draw(rng, batch_size, self.data.x_train, self.data.y_train)


# The task modules subclass Task, so they are imported after it.
from normlab.lab import tasks_vision as _vision  # noqa: E402
from normlab.lab.tasks_inpainting import InpaintingTask  # noqa: E402
from normlab.lab.tasks_shift import FederatedTask, TTATask  # noqa: E402

TASK_CLASSES: dict[str, type[Task]] = {
    "lm_stdlib": LMTask,
    "digits": DigitsTask,
    "digits_resnet": _vision.DigitsResNetTask,
    "style_shift": _vision.StyleShiftTask,
    "inpainting": InpaintingTask,
    "tta": TTATask,
    "federated": FederatedTask,
}


def task_class(task: str) -> type[Task]:
    """The :class:`Task` subclass of the task name ``task``."""
    if task not in TASK_CLASSES:
        raise ValueError(f"task: expected one of {tuple(TASK_CLASSES)}, got {task!r}")
    return TASK_CLASSES[task]


def make_task(cfg: SuiteConfig, dist: DistInfo, device: torch.device) -> Task:
    """The :class:`Task` of ``cfg.task``, with its data loaded."""
    return task_class(cfg.task)(cfg, dist, device)
