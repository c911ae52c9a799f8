"""Models and real text for the exact residual-stream surgery tests (fold_ln, RMSNorm / CRMSNorm conversion).

Text: Python stdlib source files as bytes. GPT-2 reads them as its single-byte tokens (ids 0-255 of its byte-level
vocabulary, in the byte-to-unicode order of that vocabulary); normlab's byte-level ``DecoderLM`` reads the bytes.
"""

from __future__ import annotations

import copy
import functools
import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normlab.models import DecoderLM, TransformerConfig
from tests._extras import require

_FILES = ("json/decoder.py", "textwrap.py", "heapq.py", "shlex.py", "fractions.py", "argparse.py", "difflib.py")


@functools.cache
def stdlib_bytes() -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    return b"\n".join((root / f).read_bytes() for f in _FILES)


def _gpt2_byte_order() -> list[int]:
    # GPT-2's byte-level BPE vocabulary starts with the 256 single bytes: printable ones first (! to ~, ¡ to ¬,
    # ® to ÿ), then the remaining bytes in increasing order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return printable + [b for b in range(256) if b not in printable]


def text_ids(n_seq: int, seq_len: int, *, offset: int = 0, gpt2: bool = False) -> Tensor:
    """``(n_seq, seq_len)`` token ids: consecutive windows of stdlib source bytes starting at byte ``offset``."""
    data = torch.tensor(list(stdlib_bytes()[offset : offset + n_seq * seq_len]), dtype=torch.long)
    if gpt2:
        lut = torch.empty(256, dtype=torch.long)
        lut[torch.tensor(_gpt2_byte_order())] = torch.arange(256)
        data = lut[data]
    return data.view(n_seq, seq_len)


def _perturb(model: nn.Module, seed: int, norm_key: str) -> None:
    """Random LayerNorm affines and biases (a config-built model has γ = 1, β = 0 and zero biases, which would make a
    fold trivially exact)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norm_key in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def gpt2(*, perturb: bool = True, dropout: float = 0.0, cls: str = "GPT2LMHeadModel", **overrides: Any) -> nn.Module:
    """A small config-built Hugging Face GPT-2 (Conv1D layers, tied head) in eval mode, vocabulary 320."""
    transformers = require("transformers", "hf")
    transformers.logging.set_verbosity_error()
    kw: dict[str, Any] = {
        "n_embd": 48,
        "n_layer": 2,
        "n_head": 4,
        "vocab_size": 320,
        "n_positions": 128,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
    }
    kw.update(overrides)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(transformers.GPT2Config(**kw)).eval()
    if perturb:
        _perturb(model, 1, "ln_")
    return model


@functools.cache
def _trained_decoder(mlp: str, steps: int) -> DecoderLM:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        d_model=48, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=64, bias=True, mlp=mlp, placement="pre"
    )
    model = DecoderLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = text_ids(8, 64, offset=4096 + step * 8 * 64)
        loss = model(batch, labels=batch).loss
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def trained_decoder(mlp: str = "gelu", steps: int = 40) -> DecoderLM:
    """A byte-level Pre-LN ``DecoderLM`` trained ``steps`` AdamW steps on stdlib source (a fresh copy)."""
    return copy.deepcopy(_trained_decoder(mlp, steps))


def logits(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits.double()


def max_logprob_delta(a: nn.Module, b: nn.Module, ids: Tensor) -> float:
    return (logits(a, ids).log_softmax(-1) - logits(b, ids).log_softmax(-1)).abs().max().item()


def max_logit_delta(a: nn.Module, b: nn.Module, ids: Tensor) -> float:
    return (logits(a, ids) - logits(b, ids)).abs().max().item()
