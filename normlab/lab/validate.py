"""``normlab lab --dry-run``: check a parsed suite beyond its schema by building every arm's model and running one
tiny forward/backward, collecting every problem instead of stopping at the first."""

from __future__ import annotations

import torch

from normlab.lab.config import SuiteConfig, model_config_class

__all__ = ["check_suite"]


def check_suite(cfg: SuiteConfig) -> list[str]:
    """Problems found by building each arm's model and running a 2-sample forward/backward (empty: all good)."""
    problems: list[str] = []
    cls = model_config_class(cfg.task)
    for i, arm in enumerate(cfg.arms):
        where = f"arms[{i}] ({arm.name})"
        try:
            model_cfg = cls.from_dict(cfg.arm_model(arm))
            if cfg.task == "lm_stdlib":
                from normlab.models import DecoderLM

                model: torch.nn.Module = DecoderLM(model_cfg)
                ids = torch.randint(0, 256, (2, min(8, cfg.seq_len)))
                out = model(ids, labels=ids)
            else:
                from normlab.models.cnn import DigitsCNN

                model = DigitsCNN(model_cfg)
                out = model(torch.rand(2, model_cfg.in_channels, 8, 8), labels=torch.tensor([0, 1]))
            out.loss.backward()
        except Exception as exc:  # every failure is a problem to report, whatever its type
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            problems.append(f"{where}: {type(exc).__name__}: {msg}")
    return problems
