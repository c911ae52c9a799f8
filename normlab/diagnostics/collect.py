"""One entry point, :func:`collect`, that runs the diagnostics of :mod:`normlab.diagnostics` on a model and
returns tidy rows: D1 angular distance, D2 layer removal, D3 gradient norms, D4 variance growth, D5 massive
activations, D6 attention entropy, and the batch-statistic fluctuation of PowerNorm
(https://arxiv.org/abs/2003.07845). See the per-family modules for the papers and exact definitions.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from normlab.diagnostics._capture import (
    Batches,
    BlockCapture,
    Layers,
    LossFn,
    Row,
    as_batches,
    find_layers,
    first_tensor,
    run_model,
    token_mask,
)
from normlab.diagnostics.attention import AttentionEntropy
from normlab.diagnostics.batch_stats import BatchStatMonitor
from normlab.diagnostics.gradients import gradient_rows, layer_skip_rows
from normlab.diagnostics.representation import REPRESENTATION_METRICS, RepresentationStats

__all__ = ["DEFAULT_METRICS", "METRICS", "collect"]

GRADIENT_METRICS = ("param_grad_norm", "activation_grad_norm")
METRICS = (
    *REPRESENTATION_METRICS,
    "attention_entropy",
    *GRADIENT_METRICS,
    "layer_skip_delta_loss",
    "batch_stat_deviation",
)
# Forward-only metrics that need neither a loss nor a train-mode pass.
DEFAULT_METRICS = (*REPRESENTATION_METRICS, "attention_entropy")


def collect(
    model: nn.Module,
    batches: Batches,
    metrics: Sequence[str] | None = None,
    *,
    layers: Layers = None,
    loss_fn: LossFn | None = None,
    max_gap: int = 1,
    top_k: int = 3,
    per_parameter: bool = False,
) -> list[Row]:
    """Run diagnostics on ``model`` over one or several batches and return tidy rows.

    Each row is a dict with ``metric``, ``layer`` and ``value`` and, where it applies, ``variant``, ``head``,
    ``gap``, ``module``, ``step`` and ``count`` (how many tokens / sequences were pooled). ``layer`` is the 1-based
    block index, with 0 for the embedding output in the per-layer hidden-state metrics.

    The model runs in eval mode (no dropout, running statistics) and its modes, parameters, ``.grad`` fields and
    buffers are the same afterwards. Only ``batch_stat_deviation`` switches the batch-dependent norms (and nothing
    else) to train mode for one forward per batch, then restores their buffers.

    Padding (``attention_mask`` 0) is never counted, and the statistics are pooled over batches, so a padded batch
    gives the same forward metrics as its sequences one at a time.

    Args:
        model: a normlab model (``model.blocks``) or a Hugging Face model (blocks found at ``encoder.layer``,
            ``model.layers``, ``transformer.h``, ...; without a block list the forward metrics fall back to
            ``output_hidden_states=True``).
        batches: a batch or an iterable of batches; a batch is a token-id tensor or a mapping of keyword arguments
            for ``model(**batch)`` (``input_ids``, ``attention_mask``, ``labels``, ``token_type_ids``...).
        metrics: names from :data:`METRICS`; default :data:`DEFAULT_METRICS` (the forward-only ones).
        layers: the blocks, as modules or an attribute path (default: discovered).
        loss_fn: ``(output, batch) -> scalar`` for the gradient and layer-removal metrics; default the output's
            ``loss`` (put ``labels`` in the batch).
        max_gap: largest ``n`` of the angular distance ``d(x_ℓ, x_{ℓ+n})``.
        top_k: number of largest magnitudes in ``massive_activations``.
        per_parameter: also one ``param_grad_norm`` row per parameter of each block.

    Raises:
        ValueError: an unknown metric, no usable block list where one is needed, or no loss for the gradient /
            layer-removal metrics.

    Example:
        >>> from normlab.models import DecoderLM, TransformerConfig
        >>> model = DecoderLM(TransformerConfig(d_model=32, n_layers=2, n_heads=2))
        >>> ids = torch.randint(0, 256, (2, 8))
        >>> rows = collect(model, {"input_ids": ids, "labels": ids}, ["hidden_rms", "param_grad_norm"])
        >>> sorted({(r["metric"], r["layer"]) for r in rows})[:3]
        [('hidden_rms', 0), ('hidden_rms', 1), ('hidden_rms', 2)]
    """
    chosen = _chosen_metrics(model, metrics)
    batch_list = as_batches(batches)
    modes = {m: m.training for m in model.modules()}
    blocks = _discover_blocks(model, layers)
    rows: list[Row] = []
    try:
        model.eval()
        rep = [m for m in chosen if m in REPRESENTATION_METRICS]
        if rep or "attention_entropy" in chosen:
            rows += _forward_metrics(model, batch_list, blocks, rep, "attention_entropy" in chosen, max_gap, top_k)
        if any(m in chosen for m in (*GRADIENT_METRICS, "layer_skip_delta_loss")):
            if blocks is None:
                find_layers(model, layers)  # raises the informative error
            else:
                rows += _loss_metrics(model, batch_list, blocks, chosen, loss_fn, per_parameter)
        if "batch_stat_deviation" in chosen:
            rows += _batch_stat_rows(model, batch_list, blocks)
    finally:
        for m, training in modes.items():
            m.train(training)
    return rows


def _chosen_metrics(model: Any, metrics: Sequence[str] | None) -> tuple[str, ...]:
    """The metrics to compute, after checking ``model`` and the names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"collect: expected model to be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(metrics, str):
        raise TypeError(f"collect: expected metrics to be a sequence of names, got the string {metrics!r}")
    chosen = tuple(DEFAULT_METRICS if metrics is None else metrics)
    unknown = [m for m in chosen if m not in METRICS]
    if unknown:
        raise ValueError(f"collect: unknown metrics {unknown}; expected names from {', '.join(METRICS)}")
    return chosen


def _discover_blocks(model: nn.Module, layers: Layers) -> list[nn.Module] | None:
    """The blocks named by ``layers``, or discovered; ``None`` when discovery finds none (the forward metrics then
    fall back to ``output_hidden_states``). A ``layers`` that names no block raises."""
    try:
        return find_layers(model, layers)
    except ValueError:
        if layers is not None:
            raise
        return None


def _loss_metrics(
    model: nn.Module,
    batch_list: list[dict[str, Any]],
    blocks: list[nn.Module],
    chosen: Sequence[str],
    loss_fn: LossFn | None,
    per_parameter: bool,
) -> list[Row]:
    """The metrics that need a loss: the gradient norms (D3) and the layer-removal loss change (D2)."""
    rows: list[Row] = []
    if any(m in chosen for m in GRADIENT_METRICS):
        grad_rows = gradient_rows(
            model,
            batch_list,
            layers=blocks,
            loss_fn=loss_fn,
            per_parameter=per_parameter,
            activations="activation_grad_norm" in chosen,
        )
        rows += [r for r in grad_rows if r["metric"] in chosen]
    if "layer_skip_delta_loss" in chosen:
        rows += layer_skip_rows(model, batch_list, layers=blocks, loss_fn=loss_fn)
    return rows


@torch.no_grad()
def _forward_metrics(
    model: nn.Module,
    batch_list: list[dict[str, Any]],
    blocks: list[nn.Module] | None,
    rep_metrics: list[str],
    entropy: bool,
    max_gap: int,
    top_k: int,
) -> list[Row]:
    stats = RepresentationStats(rep_metrics, max_gap=max_gap, top_k=top_k) if rep_metrics else None
    ent = AttentionEntropy() if entropy else None
    for batch in batch_list:
        handles = []
        if ent is not None and blocks is not None:
            for i, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(_setter(ent, i + 1)))
                handles.append(block.register_forward_hook(_setter(ent, None, post=True)))
        mask_src = batch.get("attention_mask")
        if ent is not None:
            ent.set_query_mask(mask_src.bool() if isinstance(mask_src, torch.Tensor) else None)
        try:
            if blocks is not None:
                cap = BlockCapture(blocks)
                with cap.attached():
                    output = _run(model, batch, ent, hidden=False)
                inputs, outputs = cap.inputs, cap.outputs
            else:
                output = _run(model, batch, ent, hidden=True)
                hs = output.get("hidden_states") if hasattr(output, "get") else getattr(output, "hidden_states", None)
                if not hs:
                    raise ValueError(
                        f"collect: {type(model).__name__} has no block list and returned no hidden_states; pass layers="
                    )
                inputs, outputs = list(hs[:-1]), list(hs[1:])
        finally:
            for h in handles:
                h.remove()
        if stats is not None:
            if any(t is None for t in (*inputs, *outputs)):
                raise ValueError("collect: could not capture the hidden states of every block; pass layers=")
            xs = [t for t in inputs if t is not None]
            ys = [t for t in outputs if t is not None]
            stats.update(xs, ys, token_mask(batch, xs[0].shape, xs[0].device))
    rows: list[Row] = stats.rows() if stats is not None else []
    if ent is not None:
        if ent.calls == 0:
            warnings.warn(
                "collect: no attention call was seen (neither F.scaled_dot_product_attention nor returned "
                "attentions), so there are no attention_entropy rows",
                stacklevel=3,
            )
        rows += ent.rows()
    return rows


def _setter(ent: AttentionEntropy, layer: int | None, post: bool = False) -> Callable[..., None]:
    if post:
        return lambda module, args, output: ent.set_layer(layer)
    return lambda module, args: ent.set_layer(layer)


def _run(model: nn.Module, batch: dict[str, Any], ent: AttentionEntropy | None, hidden: bool) -> Any:
    extra: dict[str, Any] = {"output_hidden_states": True} if hidden else {}
    if ent is None:
        return run_model(model, batch, **extra)
    with ent:
        output = run_model(model, batch, **extra)
    if ent.calls == 0:
        # Eager attention that returned its probabilities (Hugging Face ``output_attentions=True``).
        attns = output.get("attentions") if hasattr(output, "get") else getattr(output, "attentions", None)
        for ell, a in enumerate(attns or (), start=1):
            t = first_tensor(a)
            if t is not None:
                ent.add_probs(t.detach(), layer=ell)
    return output


@torch.no_grad()
def _batch_stat_rows(model: nn.Module, batch_list: list[dict[str, Any]], blocks: list[nn.Module] | None) -> list[Row]:
    monitor = BatchStatMonitor(model, layers=blocks)
    saved = [(m, copy.deepcopy(m.state_dict())) for _, m, _ in monitor.modules]
    try:
        for m, _ in saved:
            m.train()
        with monitor:
            for batch in batch_list:
                run_model(model, batch)
    finally:
        for m, state in saved:
            m.load_state_dict(state)
            m.eval()
    return monitor.rows()
