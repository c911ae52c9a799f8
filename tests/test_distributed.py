"""Cross-rank statistics of the batch-dependent norms, with 2 CPU processes on the gloo backend.

One spawn (a module fixture) runs every scenario on 2 ranks and saves what each rank saw; the tests compare it with
one process holding all sequences: N ranks with b sequences each must give the same outputs, input gradients,
summed parameter gradients and running statistics as one process with N*b sequences, including uneven valid-token
counts and a step where rank 1 holds nothing but padding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from normlab import BatchNorm, PowerNorm, PRepBatchNorm, RepBatchNorm, UnifiedNorm
from normlab.surgery import convert_sync_norms

WORLD = 2
B, N, C, STEPS = 4, 5, 4, 4
TOKEN_ROWS = ([0, 1], [2, 3])  # sequences per rank
IMAGE_ROWS = ([0, 1, 2], [3])  # uneven per-rank batch for the channel-first case
# Uneven sequences per rank for the norms whose backward averages over all positions (PN, UN): the position count
# is summed across ranks, so 15 positions on rank 0 and 5 on rank 1 must weigh like 20 in one process.
UNEVEN_ROWS = ([0, 1, 2], [3])
UNEVEN_NORMS = ("batch_norm", "power_norm", "unified_norm", "unified_norm_no_filter")
# Valid lengths per sequence and step; step 1 leaves rank 1 (sequences 2, 3) with padding only; step 3 has no mask.
LENGTHS: tuple[tuple[int, ...] | None, ...] = ((5, 3, 4, 2), (2, 5, 0, 0), (1, 1, 5, 5), None)

TOKEN_NORMS: dict[str, Callable[[], nn.Module]] = {
    "batch_norm": lambda: BatchNorm(C, channel_dim=-1),
    "rep_batch_norm": lambda: RepBatchNorm(C),
    "prep_batch_norm": lambda: PRepBatchNorm(C, total_steps=3),
    "power_norm": lambda: PowerNorm(C, group_num=2, warmup_iters=2),
    "unified_norm": lambda: UnifiedNorm(C, window_size=2, warmup_iters=2, outlier_filtration=True),
    "unified_norm_no_filter": lambda: UnifiedNorm(C, window_size=(2, 3), warmup_iters=3),
}


def _data() -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
    g = torch.Generator().manual_seed(1234)
    offset = torch.linspace(-1.0, 1.0, C)
    xs = [torch.randn(B, N, C, generator=g) * 1.5 + offset for _ in range(STEPS)]
    dys = [torch.randn(B, N, C, generator=g) for _ in range(STEPS)]
    masks: list[Tensor | None] = []
    for lengths in LENGTHS:
        masks.append(None if lengths is None else torch.arange(N)[None, :] < torch.tensor(lengths)[:, None])
    return xs, dys, masks


def _perturb(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.add_(0.1 * torch.linspace(-1.0, 1.0, p.numel()).reshape(p.shape) + 0.05 * i)
    return m


def _record(m: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
    return {
        "y": y.detach().clone(),
        "dx": x.grad.clone() if x.grad is not None else None,
        "grads": {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None},
        "buffers": {k: b.clone() for k, b in m.named_buffers()},
    }


def run_tokens(
    name: str, rows: list[int], process_group: Any = None, sync_stats: bool = True, steps: int = STEPS
) -> list[dict[str, Any]]:
    """Train-mode steps of one token norm on the given sequences; what each step produced."""
    xs, dys, masks = _data()
    m = _perturb(TOKEN_NORMS[name]())
    for sub in m.modules():
        if hasattr(sub, "sync_stats"):
            sub.process_group, sub.sync_stats = process_group, sync_stats
    out = []
    for s in range(steps):
        m.zero_grad()
        x = xs[s][rows].clone().requires_grad_(True)
        mask = masks[s]
        y = m(x, mask=None if mask is None else mask[rows])
        (y * dys[s][rows]).sum().backward()
        out.append(_record(m, x, y))
    return out


def _image_net() -> nn.Module:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    return _perturb(net)


def run_images(rows: list[int], convert: bool) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(99)
    xs = [torch.randn(4, 3, 5, 6, generator=g) for _ in range(2)]
    net = _image_net()
    if convert:
        net = convert_sync_norms(net)
    out = []
    for x_full in xs:
        net.zero_grad()
        x = x_full[rows].clone().requires_grad_(True)
        y = net(x)
        dy = torch.linspace(-1, 1, 4 * y[0].numel()).reshape(4, *y.shape[1:])[rows]
        (y * dy).sum().backward()
        out.append(_record(net, x, y))
    return out


def _worker(rank: int, store: str, outdir: str) -> None:
    torch.set_num_threads(1)
    # A file store, not a TCP port: picking a "free" port and binding it later races with other processes.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results: dict[str, Any] = {}
        pair = dist.new_group([0, 1])
        for name in TOKEN_NORMS:
            group = pair if name == "unified_norm" else None  # an explicit group for one case, WORLD for the rest
            results[name] = run_tokens(name, TOKEN_ROWS[rank], process_group=group)
        for name in UNEVEN_NORMS:
            results[f"{name}_uneven"] = run_tokens(name, UNEVEN_ROWS[rank])
        # A one-rank subgroup per rank (every rank creates every group): process_group is honoured, not WORLD.
        singles = [dist.new_group([r]) for r in range(WORLD)]
        results["power_norm_subgroup"] = run_tokens(
            "power_norm", TOKEN_ROWS[rank], process_group=singles[rank], steps=1
        )
        # One step only: at step 1 rank 1 has no valid token, which a per-rank statistic refuses.
        results["batch_norm_local"] = run_tokens("batch_norm", TOKEN_ROWS[rank], sync_stats=False, steps=1)
        results["power_norm_local"] = run_tokens("power_norm", TOKEN_ROWS[rank], sync_stats=False, steps=1)
        results["images"] = run_images(IMAGE_ROWS[rank], convert=True)
        # Every rank refuses an all-padding global batch with the same error (no rank left hanging).
        m = BatchNorm(C, channel_dim=-1)
        try:
            m(torch.randn(2, N, C), mask=torch.zeros(2, N, dtype=torch.bool))
            results["empty_error"] = ""
        except ValueError as e:
            results["empty_error"] = str(e)
        torch.save(results, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    outdir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(outdir / "store"), str(outdir)), nprocs=WORLD, join=True)
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(a: Tensor, b: Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _compare(ref: list[dict[str, Any]], per_rank: list[list[dict[str, Any]]], rows: tuple[list[int], ...]) -> None:
    for s, full in enumerate(ref):
        for r, steps in enumerate(per_rank):
            got = steps[s]
            _close(got["y"], full["y"][rows[r]], f"step {s} rank {r} output")
            _close(got["dx"], full["dx"][rows[r]], f"step {s} rank {r} input gradient")
            assert got["buffers"].keys() == full["buffers"].keys()
            for k, v in full["buffers"].items():
                _close(got["buffers"][k].to(v.dtype), v, f"step {s} rank {r} buffer {k}")
        assert all(steps[s]["grads"].keys() == full["grads"].keys() for steps in per_rank)
        for k, v in full["grads"].items():
            _close(sum(steps[s]["grads"][k] for steps in per_rank), v, f"step {s} summed grad {k}")


@pytest.mark.parametrize("name", list(TOKEN_NORMS))
def test_two_ranks_match_one_process(ranks: list[dict[str, Any]], name: str) -> None:
    _compare(run_tokens(name, [0, 1, 2, 3]), [r[name] for r in ranks], TOKEN_ROWS)


@pytest.mark.parametrize("name", UNEVEN_NORMS)
def test_uneven_sequences_per_rank_match_one_process(ranks: list[dict[str, Any]], name: str) -> None:
    _compare(run_tokens(name, [0, 1, 2, 3]), [r[f"{name}_uneven"] for r in ranks], UNEVEN_ROWS)


def test_a_one_rank_process_group_keeps_statistics_on_that_rank(ranks: list[dict[str, Any]]) -> None:
    for r, rows in enumerate(TOKEN_ROWS):
        local = run_tokens("power_norm", rows, steps=1)
        _compare(local, [ranks[r]["power_norm_subgroup"]], (list(range(len(rows))),))
    synced = run_tokens("power_norm", [0, 1, 2, 3], steps=1)
    assert not torch.allclose(ranks[0]["power_norm_subgroup"][0]["y"], synced[0]["y"][:2])


@pytest.mark.parametrize("name", ["batch_norm", "power_norm"])
def test_sync_stats_false_keeps_per_rank_statistics(ranks: list[dict[str, Any]], name: str) -> None:
    for r, rows in enumerate(TOKEN_ROWS):
        local = run_tokens(name, rows, steps=1)
        _compare(local, [ranks[r][f"{name}_local"]], (list(range(len(rows))),))
    synced = run_tokens(name, [0, 1, 2, 3])
    assert not torch.allclose(ranks[0][f"{name}_local"][0]["y"], synced[0]["y"][:2])


def test_convert_sync_norms_matches_torch_batchnorm_on_the_full_batch(ranks: list[dict[str, Any]]) -> None:
    ref = run_images([0, 1, 2, 3], convert=False)  # plain torch.nn.BatchNorm2d, one process, 4 images
    _compare(ref, [r["images"] for r in ranks], IMAGE_ROWS)


def test_all_padding_everywhere_is_refused_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert "expected more than 1 valid (unmasked) value per channel" in r["empty_error"]
        assert "summed over 2 ranks" in r["empty_error"]
