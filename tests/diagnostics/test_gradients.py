"""Tests of normlab/diagnostics/gradients.py: per-block gradient norms equal those of a plain backward (and leave
``.grad`` alone), activation gradients equal retained gradients, and layer skipping equals rebuilding the model
without the block."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from normlab.diagnostics import activation_grad_rows, gradient_rows, layer_skip_rows, param_grad_rows
from normlab.models import DecoderLM, TransformerConfig
from tests.diagnostics._toy import Scale, ToyModel, TupleBlock


def _model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(TransformerConfig(d_model=16, n_layers=3, n_heads=2, max_seq_len=8))


def _batch() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (3, 8), generator=g)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def test_param_grad_norms_match_backward_and_leave_grads_alone() -> None:
    model, batch = _model(), _batch()
    rows = gradient_rows(model, batch, activations=False)
    assert all(p.grad is None for p in model.parameters())
    model(**batch).loss.backward()
    for ell, block in enumerate(model.blocks, start=1):
        total = math.sqrt(sum(float(p.grad.double().square().sum()) for p in block.parameters()))
        n = sum(p.numel() for p in block.parameters())
        got = {r["variant"]: r["value"] for r in rows if r["layer"] == ell}
        assert got["total"] == pytest.approx(total, rel=1e-6)
        assert got["total_per_sqrt_param"] == pytest.approx(total / math.sqrt(n), rel=1e-6)
        assert got["attn.q_proj.weight"] == pytest.approx(float(block.attn.q_proj.weight.grad.norm()), rel=1e-5)
    # The training-loop variant reads the same .grad fields.
    after = param_grad_rows(model)
    assert [r["value"] for r in after] == pytest.approx([r["value"] for r in rows], rel=1e-6)


def test_activation_grads_match_retained_grads() -> None:
    model, batch = _model(), _batch()
    rows = activation_grad_rows(model, batch)
    kept: list[Tensor] = []

    def keep(module: nn.Module, args: tuple, output: Tensor) -> None:
        output.retain_grad()
        kept.append(output)

    handles = [b.register_forward_hook(keep) for b in model.blocks]
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    mask = batch["attention_mask"].bool()
    for ell, t in enumerate(kept, start=1):
        g = t.grad.double()[mask]
        got = {r["variant"]: r["value"] for r in rows if r["layer"] == ell}
        assert got["token_mean"] == pytest.approx(float(g.norm(dim=-1).mean()), rel=1e-6)
        assert got["global"] == pytest.approx(float(g.norm()), rel=1e-6)
    assert {r["layer"] for r in rows} == {0, 1, 2, 3}


class _PassThrough(nn.Module):
    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        return x


def test_layer_skip_equals_removing_the_block() -> None:
    model, batch = _model().eval(), _batch()
    rows = layer_skip_rows(model, batch)
    with torch.no_grad():
        base = float(model(**batch).loss)
        for ell in (1, 2, 3):
            pruned = copy.deepcopy(model)
            pruned.blocks[ell - 1] = _PassThrough()
            expected = float(pruned(**batch).loss)
            row = next(r for r in rows if r["layer"] == ell)
            assert row["loss"] == pytest.approx(expected, rel=1e-6)
            assert row["value"] == pytest.approx(expected - base, abs=1e-6)
            assert row["base_loss"] == pytest.approx(base, rel=1e-6)


def test_layer_skip_on_tuple_blocks_averages_batches() -> None:
    model = ToyModel([TupleBlock(Scale(2.0)), TupleBlock(Scale(-3.0))], tuple_out=True)
    ids = [torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6, 7]])]
    rows = layer_skip_rows(model, ids)
    with torch.no_grad():
        base = sum(float(model(i).loss) for i in ids) / 2
        for ell in (1, 2):
            pruned = copy.deepcopy(model)
            pruned.layers[ell - 1] = TupleBlock(Scale(1.0))
            expected = sum(float(pruned(i).loss) for i in ids) / 2
            row = rows[ell - 1]
            assert row["layer"] == ell
            assert row["loss"] == pytest.approx(expected, rel=1e-6)
            assert row["value"] == pytest.approx(expected - base, rel=1e-6, abs=1e-9)


def test_needs_a_loss() -> None:
    model = _model()
    with pytest.raises(ValueError, match="has no loss; put labels in the batch or pass loss_fn"):
        gradient_rows(model, torch.randint(0, 256, (2, 8)))
    with pytest.raises(ValueError, match="expected the loss to be a scalar Tensor"):
        layer_skip_rows(model, torch.randint(0, 256, (2, 8)), loss_fn=lambda out, batch: out.logits)
