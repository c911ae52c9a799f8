"""Gradient diagnostics per block (D3) and the loss change when one block is
removed (D2).

Papers: Mix-LN (Li et al. 2024, https://arxiv.org/abs/2412.13795; Figs 2-3, 6), LayerNorm Scaling (Sun et al. 2025,
https://arxiv.org/abs/2502.05795), Peri-LN (Kim et al. 2025, https://arxiv.org/abs/2502.02732; Fig 7), NormFormer
(Shleifer et al. 2021, https://arxiv.org/abs/2110.09456); the activation-gradient variant follows Liu et al.,
"Understanding the Difficulty of Training Transformers" (https://arxiv.org/abs/2004.08249). Layer removal follows
Gromov et al. 2024 (https://arxiv.org/abs/2403.17887).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from normlab.diagnostics._capture import (
    Batches,
    BlockCapture,
    Layers,
    LossFn,
    MeanAcc,
    Row,
    as_batches,
    find_layers,
    get_loss,
    run_model,
    token_mask,
)

__all__ = ["activation_grad_rows", "gradient_rows", "layer_skip_rows", "param_grad_rows"]


def _block_params(layer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in layer.named_parameters() if p.requires_grad]


def _param_rows_from(
    layers: Sequence[nn.Module], grads: Sequence[Sequence[Tensor | None]], per_parameter: bool
) -> list[tuple[tuple[Any, ...], float]]:
    out: list[tuple[tuple[Any, ...], float]] = []
    for ell, (layer, layer_grads) in enumerate(zip(layers, grads), start=1):
        named = _block_params(layer)
        total_sq, n_params = 0.0, 0
        for (name, p), g in zip(named, layer_grads):
            sq = float(g.detach().double().square().sum()) if g is not None else 0.0
            total_sq += sq
            n_params += p.numel()
            if per_parameter:
                out.append(((ell, name), math.sqrt(sq)))
        out.append(((ell, "total"), math.sqrt(total_sq)))
        out.append(((ell, "total_per_sqrt_param"), math.sqrt(total_sq) / math.sqrt(max(n_params, 1))))
    return out


def param_grad_rows(
    model: nn.Module, *, layers: Layers = None, per_parameter: bool = True
) -> list[Row]:
    """Per-block parameter gradient norms from the ``.grad`` fields left by your own ``loss.backward()``.

    For use inside a training loop (after backward, before clipping and the optimizer step).
    Rows: ``metric="param_grad_norm"``, ``layer`` ℓ (1-based), ``variant`` ``total`` (``√Σ‖∇p‖²`` over the block),
    ``total_per_sqrt_param`` (divided by ``√#params``) and, with ``per_parameter``, the parameter's name inside the
    block (e.g. ``attn.q_proj.weight``). Parameters without a gradient count as zero.
    """
    blocks = find_layers(model, layers)
    grads = [[p.grad for _, p in _block_params(b)] for b in blocks]
    return [
        {"metric": "param_grad_norm", "layer": ell, "variant": variant, "value": value}
        for (ell, variant), value in _param_rows_from(blocks, grads, per_parameter)
    ]


def gradient_rows(
    model: nn.Module,
    batches: Batches,
    *,
    layers: Layers = None,
    loss_fn: LossFn | None = None,
    per_parameter: bool = True,
    activations: bool = True,
) -> list[Row]:
    """Per-block parameter gradient norms (D3) and activation gradient norms, averaged over ``batches``.

    Gradients are taken with :func:`torch.autograd.grad`, so the model's ``.grad`` fields are left untouched. The
    model runs in its current mode (the collectors put it in eval mode, with no dropout).

    Rows:
        - ``param_grad_norm`` per block, see :func:`param_grad_rows`; each batch's norm, averaged over batches.
        - ``activation_grad_norm`` at ``layer`` 0 (embedding output) and ℓ (output of block ℓ): ``token_mean``
          (mean over valid tokens of ``‖∂L/∂x_t‖₂``) and ``global`` (``‖∂L/∂x‖_F`` over the valid tokens).

    Args:
        model: the model.
        batches: a batch or several (see :func:`~normlab.diagnostics.collect`).
        layers: the blocks (default: discovered).
        loss_fn: ``(output, batch) -> scalar``; default the output's ``loss``.
        per_parameter: also one row per parameter of each block.
        activations: also the activation gradient rows.
    """
    blocks = find_layers(model, layers)
    acc = MeanAcc()
    for batch in as_batches(batches):
        cap = BlockCapture(blocks, detach=False)
        with cap.attached():
            output = run_model(model, batch)
        loss = get_loss(output, batch, loss_fn)
        params = [[p for _, p in _block_params(b)] for b in blocks]
        flat = [p for ps in params for p in ps]
        states: list[Tensor] = []
        if activations:
            states = [t for t in [cap.inputs[0], *cap.outputs] if t is not None]
            if len(states) != len(blocks) + 1 or not all(t.requires_grad for t in states):
                raise ValueError(
                    "gradient_rows: could not capture differentiable block inputs/outputs; pass activations=False"
                )
        grads = torch.autograd.grad(loss, [*flat, *states], allow_unused=True)
        it = iter(grads[: len(flat)])
        per_block = [[next(it) for _ in ps] for ps in params]
        for key, value in _param_rows_from(blocks, per_block, per_parameter):
            acc.add(("param_grad_norm", *key), value, 1.0)
        if activations:
            mask = token_mask(batch, states[0].shape, states[0].device)
            for ell, g in enumerate(grads[len(flat) :]):
                for stat, value in _activation_stats(g, mask):
                    acc.add(("activation_grad_norm", ell, stat), value, 1.0)
    return [
        {"metric": metric, "layer": ell, "variant": variant, "value": value}
        for (metric, ell, variant), value, _ in acc.items()
    ]


def _activation_stats(g: Tensor | None, mask: Tensor) -> list[tuple[str, float]]:
    if g is None:
        return [("token_mean", 0.0), ("global", 0.0)]
    valid = g.detach().double()[mask]
    per_token = valid.norm(dim=-1)
    return [("token_mean", float(per_token.mean())), ("global", float(valid.norm()))]


def activation_grad_rows(
    model: nn.Module, batches: Batches, *, layers: Layers = None, loss_fn: LossFn | None = None
) -> list[Row]:
    """Only the ``activation_grad_norm`` rows of :func:`gradient_rows`."""
    rows = gradient_rows(model, batches, layers=layers, loss_fn=loss_fn, per_parameter=False)
    return [r for r in rows if r["metric"] == "activation_grad_norm"]


@torch.no_grad()
def layer_skip_rows(
    model: nn.Module, batches: Batches, *, layers: Layers = None, loss_fn: LossFn | None = None
) -> list[Row]:
    """D2: the loss change when block ℓ is replaced by the identity (``x_{ℓ+1} := x_ℓ``), one block at a time.

    The block is skipped with a forward hook that returns its input (the block still runs; its result is
    discarded), so embeddings, the final norm and the head stay, and nothing in the model is modified.
    Losses are averaged over ``batches``.

    Rows: ``metric="layer_skip_delta_loss"``, ``layer`` ℓ, ``value`` = loss(without ℓ) − loss(full), with ``loss``
    and ``base_loss`` as extra keys.
    """
    blocks = find_layers(model, layers)
    batch_list = as_batches(batches)

    def mean_loss(skip: int | None) -> float:
        total = 0.0
        for batch in batch_list:
            cap = BlockCapture(blocks, skip=skip)
            with cap.attached():
                output = run_model(model, batch)
            total += float(get_loss(output, batch, loss_fn))
        return total / len(batch_list)

    base = mean_loss(None)
    rows: list[Row] = []
    for ell in range(1, len(blocks) + 1):
        loss = mean_loss(ell)
        rows.append({"metric": "layer_skip_delta_loss", "layer": ell, "value": loss - base, "loss": loss,
                     "base_loss": base})
    return rows
