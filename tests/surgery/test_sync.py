"""convert_sync_norms in one process: every torch BatchNorm becomes normlab's BatchNorm with the same state, flags
and outputs (eval and train, running-stat updates included); normlab norms get ``sync_stats=True`` and the group.
The cross-rank behaviour itself is tested with 2 gloo processes in ``tests/test_distributed.py``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from normlab.nn import BatchNorm, PowerNorm, PRepBatchNorm, RepBatchNorm, UnifiedNorm
from normlab.surgery import convert_sync_norms

D = torch.float64
C = 4

# (torch class, input shape, constructor kwargs)
CASES: list[tuple[type[nn.Module], tuple[int, ...], dict[str, Any]]] = [
    (nn.BatchNorm1d, (8, C), {}),
    (nn.BatchNorm1d, (3, C, 5), {}),
    (nn.BatchNorm1d, (3, C, 5), {"momentum": None}),
    (nn.BatchNorm1d, (8, C), {"affine": False}),
    (nn.BatchNorm1d, (3, C, 5), {"track_running_stats": False}),
    (nn.BatchNorm2d, (2, C, 3, 3), {"eps": 1e-3, "momentum": 0.3}),
    (nn.BatchNorm3d, (2, C, 2, 2, 2), {}),
    (nn.SyncBatchNorm, (2, C, 3, 3), {}),
]


def _torch_bn(cls: type[nn.Module], shape: tuple[int, ...], kwargs: dict[str, Any]) -> nn.Module:
    """A torch BN with non-trivial parameters and running statistics (two training steps on shifted data)."""
    torch.manual_seed(0)
    bn = cls(C, dtype=D, **kwargs).train()
    with torch.no_grad():
        if getattr(bn, "weight", None) is not None:
            bn.weight.copy_(torch.rand(C, dtype=D) + 0.5)
            bn.bias.copy_(torch.randn(C, dtype=D))
        for _ in range(2):
            bn(torch.randn(shape, dtype=D) * 2.0 + 1.0)
    return bn


def _ids(case: tuple[type[nn.Module], tuple[int, ...], dict[str, Any]]) -> str:
    cls, shape, kwargs = case
    return f"{cls.__name__}-{'x'.join(map(str, shape))}-{'-'.join(f'{k}={v}' for k, v in kwargs.items()) or 'default'}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("training", [False, True])
def test_a_torch_batch_norm_model_becomes_an_equal_synced_normlab_batch_norm(
    case: tuple[type[nn.Module], tuple[int, ...], dict[str, Any]], training: bool
) -> None:
    cls, shape, kwargs = case
    bn = _torch_bn(cls, shape, kwargs).train(training)
    if getattr(bn, "bias", None) is not None:
        bn.bias.requires_grad_(False)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    group = object()  # never used in one process: stats_group() returns None before touching it
    out = convert_sync_norms(bn, process_group=group)

    assert type(out) is BatchNorm and out is not bn
    assert out.sync_stats is True and out.process_group is group and out.channel_dim == 1
    assert out.training is training
    assert [(n, p.requires_grad) for n, p in out.named_parameters()] == [
        (n, p.requires_grad) for n, p in bn.named_parameters()
    ]
    assert out.state_dict().keys() == state.keys()
    for k, v in out.state_dict().items():
        assert v.dtype == state[k].dtype, k
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)
    assert (out.eps, out.momentum, out.affine) == (bn.eps, bn.momentum, bn.affine)

    # The same outputs in this mode, and in train mode the same running-statistic updates over two steps.
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(shape, generator=g, dtype=D) * 3.0 - 1.0
        torch.testing.assert_close(out(x), bn(x), rtol=1e-12, atol=1e-12)
    for k, v in out.state_dict().items():
        torch.testing.assert_close(v, bn.state_dict()[k], rtol=1e-12, atol=1e-12, msg=k)
    if training and kwargs.get("track_running_stats", True):
        assert not torch.equal(out.running_mean, state["running_mean"])  # the steps did update something


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(C, C, 3, padding=1, dtype=D)
        self.bn = nn.BatchNorm1d(C, dtype=D)
        self.inner = nn.Sequential(nn.Linear(C, C, dtype=D), nn.BatchNorm1d(C, dtype=D))

    def forward(self, x: Tensor) -> Tensor:  # x: (N, C, L)
        h = self.bn(self.conv(x))
        return self.inner(h.transpose(1, 2).reshape(-1, C))


def test_a_model_keeps_its_outputs_modes_and_flags_and_its_normlab_norms_turn_syncing_on() -> None:
    torch.manual_seed(1)
    model = nn.ModuleDict({
        "block": _Block(),
        "rep": RepBatchNorm(C, sync_stats=False, dtype=D),
        "pn": PowerNorm(C, group_num=2, sync_stats=False, dtype=D),
        "un": UnifiedNorm(C, sync_stats=False, dtype=D),
        "prep": PRepBatchNorm(C, total_steps=3, sync_stats=False, dtype=D),
        "bn_tokens": BatchNorm(C, channel_dim=-1, sync_stats=False, dtype=D),
    })
    x = torch.randn(3, C, 6, dtype=D) + 2.0
    tok = torch.randn(2, 5, C, dtype=D)
    model.train()
    for _ in range(2):  # non-trivial running statistics everywhere
        model["block"](x)
        for key in ("rep", "pn", "un", "prep", "bn_tokens"):
            model[key](tok)
    model.eval()
    model["block"].inner.train()  # mixed modes survive the conversion
    model["block"].conv.weight.requires_grad_(False)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    y_block = model["block"](x)
    y_tok = {k: model[k](tok) for k in ("rep", "pn", "un", "prep", "bn_tokens")}
    modes = {n: m.training for n, m in model.named_modules()}

    out = convert_sync_norms(model)

    assert out is model
    assert type(model["block"].bn) is BatchNorm and type(model["block"].inner[1]) is BatchNorm
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not model["block"].conv.weight.requires_grad
    assert model.state_dict().keys() == ref.keys()
    synced = [model["block"].bn, model["block"].inner[1], model["rep"], model["pn"], model["un"],
              model["prep"].norm2, model["bn_tokens"]]
    assert all(m.sync_stats is True and m.process_group is None for m in synced)
    torch.testing.assert_close(model["block"](x), y_block, rtol=1e-12, atol=1e-12)  # inner is in train mode
    for k, y in y_tok.items():
        torch.testing.assert_close(model[k](tok), y, rtol=0, atol=0, msg=k)
    # `inner` ran in train mode twice (before and after), both from the same state: the same update both times.
    assert int(model["block"].inner[1].num_batches_tracked) == int(ref["block.inner.1.num_batches_tracked"]) + 2
