"""Tests of normlab/models/layers.py: QK-norm variants against a float64 reference attention, the QKNorm scale
init, per-slot norm building (overrides, DyT α defaults) and mask broadcasting to batch-statistic norms."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from normlab.models import Attention, TransformerConfig
from normlab.models.layers import apply_norm, build_slot_norm
from normlab.nn import BatchNorm, DyT, LayerNorm, RMSNorm

D, H, N = 16, 4, 7


def _attention(qk_norm: str, per_head: bool = True, **kwargs: Any) -> Attention:
    cfg = TransformerConfig(d_model=D, n_heads=H, qk_norm=qk_norm, qk_norm_per_head=per_head, max_seq_len=N, **kwargs)
    attn = Attention(cfg, n_tokens=N).double()
    for norm in (attn.q_norm, attn.k_norm):  # non-trivial affine so the test sees whether it is applied
        if norm is not None:
            with torch.no_grad():
                for p in norm.parameters():
                    p.copy_(1 + 0.3 * torch.randn_like(p))
    return attn


def _rms(t: Tensor, norm: nn.Module) -> Tensor:
    return t / torch.sqrt(t.square().mean(-1, keepdim=True) + norm.eps) * norm.weight


def _layer(t: Tensor, norm: nn.Module) -> Tensor:
    mu = t.mean(-1, keepdim=True)
    var = (t - mu).square().mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _reference(attn: Attention, x: Tensor, kind: str, per_head: bool) -> Tensor:
    """Causal multi-head attention written out with explicit softmax (float64)."""
    b, n, d = x.shape
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    fn = {"rms": _rms, "layer": _layer}.get(kind)
    if fn is not None and not per_head:
        q, k = fn(q, attn.q_norm), fn(k, attn.k_norm)
    q, k, v = (t.view(b, n, H, d // H).transpose(1, 2) for t in (q, k, v))
    if fn is not None and per_head:
        q, k = fn(q, attn.q_norm), fn(k, attn.k_norm)
    scale = 1 / math.sqrt(d // H)
    if kind == "l2":
        q, k, scale = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True), float(attn.qk_scale.detach())
    logits = scale * q @ k.transpose(-1, -2)
    logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    ctx = logits.softmax(-1) @ v
    return attn.out_proj(ctx.transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize(
    ("kind", "per_head"),
    [("none", True), ("l2", True), ("rms", True), ("rms", False), ("layer", True), ("layer", False)],
)
def test_qk_norm_matches_the_reference_attention(kind: str, per_head: bool) -> None:
    attn = _attention(kind, per_head)
    x = torch.randn(2, N, D, dtype=torch.float64)
    torch.testing.assert_close(attn(x, is_causal=True), _reference(attn, x, kind, per_head))


@pytest.mark.parametrize(("kind", "cls"), [("rms", RMSNorm), ("layer", LayerNorm)])
def test_qk_norm_widths_per_head_and_joint(kind: str, cls: type) -> None:
    per_head, joint = _attention(kind, True), _attention(kind, False)
    assert isinstance(per_head.q_norm, cls) and per_head.q_norm.num_features == D // H
    assert isinstance(joint.k_norm, cls) and joint.k_norm.num_features == D
    assert per_head.qk_scale is None


def test_qk_override_picks_another_norm() -> None:
    attn = _attention("rms", True, norm_overrides={"qk": {"norm": "layer_norm", "kwargs": {"bias": False}}})
    assert isinstance(attn.q_norm, LayerNorm) and attn.q_norm.bias is None


def test_l2_qk_scale_init_is_log2_of_offdiagonal_count() -> None:
    attn = _attention("l2")
    assert float(attn.qk_scale.detach()) == pytest.approx(math.log2(N * N - N))
    assert Attention.l2_scale_init(72) == pytest.approx(12.32, abs=5e-3)  # QKNorm paper's g0 for en-vi (L = 72)
    assert Attention.l2_scale_init(1024) == pytest.approx(20.0, abs=5e-3)
    assert isinstance(attn.qk_scale, nn.Parameter) and attn.qk_scale.requires_grad
    assert attn.q_norm is None


def test_l2_logits_ignore_the_query_key_scale() -> None:
    attn, x = _attention("l2"), torch.randn(1, N, D, dtype=torch.float64)
    y = attn(x, is_causal=True)
    with torch.no_grad():
        attn.q_proj.weight.mul_(7.0)
        attn.q_proj.bias.mul_(7.0)
    torch.testing.assert_close(attn(x, is_causal=True), y)  # q is unit-normalised, so scaling W_q changes nothing


def _cfg(**kwargs: Any) -> TransformerConfig:
    return TransformerConfig(d_model=D, n_heads=H, **kwargs)


def test_build_slot_norm_overrides() -> None:
    cfg = _cfg(
        placement="peri",
        norm="rms_norm",
        norm_kwargs={"eps": 1e-3},
        norm_overrides={"attn_in": None, "attn_out": "layer_norm", "mlp_in": {"kwargs": {"affine": False}}},
    )
    assert build_slot_norm(cfg, "attn_in", D) is None
    ln = build_slot_norm(cfg, "attn_out", D)
    assert isinstance(ln, LayerNorm) and ln.eps == 1e-5  # override gets no norm_kwargs
    merged = build_slot_norm(cfg, "mlp_in", D)
    assert isinstance(merged, RMSNorm) and merged.eps == 1e-3 and merged.weight is None
    plain = build_slot_norm(cfg, "mlp_out", D)
    assert isinstance(plain, RMSNorm) and plain.eps == 1e-3 and plain.weight is not None


def test_build_slot_norm_dyt_alpha_defaults_and_explicit_values() -> None:
    alphas = {"attn_in": 0.8, "mlp_in": 0.2}
    cfg = _cfg(norm="dyt")
    a, m = build_slot_norm(cfg, "attn_in", D, dyt_alpha=alphas), build_slot_norm(cfg, "mlp_in", D, dyt_alpha=alphas)
    assert isinstance(a, DyT) and a.alpha_init == 0.8 and isinstance(m, DyT) and m.alpha_init == 0.2
    explicit = build_slot_norm(_cfg(norm="dyt", norm_kwargs={"alpha_init": 0.3}), "attn_in", D, dyt_alpha=alphas)
    assert isinstance(explicit, DyT) and explicit.alpha_init == 0.3
    slot = _cfg(norm="dyt", norm_overrides={"attn_in": {"kwargs": {"alpha_init": 1.0}}})
    assert build_slot_norm(slot, "attn_in", D, dyt_alpha=alphas).alpha_init == 1.0  # type: ignore[union-attr]
    assert isinstance(build_slot_norm(_cfg(), "attn_in", D, dyt_alpha=alphas), LayerNorm)  # not DyT: untouched


def test_apply_norm_broadcasts_the_mask_to_per_head_inputs() -> None:
    bn = BatchNorm(4, channel_dim=-1).double()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)  # (B, N, H, d_head)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y = apply_norm(bn, x, mask)
    valid = x[mask]  # (8, 3, 4): the heads of valid tokens only
    mu = valid.reshape(-1, 4).mean(0)
    var = valid.reshape(-1, 4).var(0, unbiased=False)
    torch.testing.assert_close(y[mask], (valid - mu) / torch.sqrt(var + bn.eps))
    ln = LayerNorm(4).double()
    torch.testing.assert_close(apply_norm(ln, x, mask), ln(x))  # per-token norms never see the mask
    assert apply_norm(None, x, mask) is x
