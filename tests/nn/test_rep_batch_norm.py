"""RepBN and PRepBN: hand-derived vectors, masks, the LayerNorm -> RepBN schedule of SLAB's LinearNorm, its
resumption from a state dict, the fold gate and errors.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor

from normlab import DyT, LayerNorm, PRepBatchNorm, RepBatchNorm, RMSNorm

F64 = torch.float64
X = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]], dtype=F64)


def close(got: Tensor, expected: list[float] | list[list[float]], atol: float = 2e-7) -> None:
    torch.testing.assert_close(got.detach(), torch.tensor(expected, dtype=F64), rtol=0, atol=atol)


def test_spec_vectors_train_eval_and_fold_into_linear() -> None:
    m = RepBatchNorm(2, dtype=F64).train()
    y = m(X)
    close(y[0, 0], [-0.3416394, 0.6583606])
    close(y[1, 1], [8.3416394, 9.3416394])
    close(m.running_mean, [0.4, 0.5])
    close(m.running_var, [1.5666667, 1.5666667])
    m.eval()
    fa = m.folded_affine()
    close(fa.scale, [1.7989329, 1.7989329])
    close(fa.shift, [-0.3195732, -0.3994665])
    close(m(X)[0, 0], [1.4793597, 3.1983994])
    w = torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]], dtype=F64)
    c = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    w2, c2 = w * fa.scale[None, :], c + w @ fa.shift  # norm before a torch Linear: W' = W diag(a), b' = b + W c
    close(w2, [[1.7989329, -1.7989329], [0.8994665, 3.5978658], [0.0, 1.7989329]])
    close(c2, [0.1798933, -0.7587195, -0.0994665])
    close(X[0, 0] @ w2.T + c2, [-1.6190396, 7.3364786, 3.4983994], atol=5e-7)
    torch.testing.assert_close(m(X) @ w.T + c, X @ w2.T + c2, rtol=1e-12, atol=1e-12)


def test_mask_excludes_padding_from_statistics() -> None:
    m = RepBatchNorm(2, dtype=F64).train()
    x = torch.cat([X, torch.full((2, 1, 2), 1e3, dtype=F64)], dim=1)  # a padded third token per sequence
    mask = torch.tensor([[True, True, False], [True, True, False]])
    y = m(x, mask=mask)
    torch.testing.assert_close(y[:, :2], RepBatchNorm(2, dtype=F64).train()(X))
    close(m.running_var, [1.5666667, 1.5666667])


def test_llama_variant_init_outputs_zero() -> None:
    m = RepBatchNorm(4, alpha_init=0.0, weight_init=0.0, eps=1e-6).train()
    assert torch.count_nonzero(m(torch.randn(2, 3, 4))) == 0


def _prep(**kw: object) -> PRepBatchNorm:
    return PRepBatchNorm(2, dtype=F64, **kw).train()  # type: ignore[arg-type]


def lambdas(m: PRepBatchNorm, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(m.current_lambda())
        m(X)
    return out


def test_schedule_warm_phase_then_linear_ramp() -> None:
    m = _prep(total_steps=4, warmup_steps=2)
    assert lambdas(m, 8) == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert m.ramp_finished()
    assert int(m.norm2.num_batches_tracked) == 6  # BN statistics update on every post-warm training forward


def test_train_output_is_the_lambda_mix_and_eval_is_repbn() -> None:
    m = _prep(total_steps=4, norm1_eps=1e-6)
    with torch.no_grad():
        m.norm2.alpha.fill_(0.3)
    ln = LayerNorm(2, eps=1e-6, dtype=F64)
    m(X)  # lambda = 1
    probe = RepBatchNorm(2, dtype=F64).train()
    with torch.no_grad():
        probe.alpha.fill_(0.3)
    probe(X)  # the same statistic update as the first step
    y = m(X)  # lambda = 0.75
    torch.testing.assert_close(y, 0.75 * ln(X) + 0.25 * probe(X))
    m.eval()
    probe.eval()
    torch.testing.assert_close(m(X), probe(X))


def test_warm_phase_leaves_batch_statistics_alone() -> None:
    m = _prep(total_steps=4, warmup_steps=3)
    y = m(X)
    torch.testing.assert_close(y, m.norm1(X))
    assert int(m.norm2.num_batches_tracked) == 0
    close(m.norm2.running_mean, [0.0, 0.0])


def test_decrement_every_moves_counters_once_per_n_forwards() -> None:
    m = _prep(total_steps=2, warmup_steps=1, decrement_every=3)
    assert lambdas(m, 10) == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.0]


def test_state_dict_resume_continues_the_ramp() -> None:
    full = _prep(total_steps=5, warmup_steps=1)
    expected = lambdas(full, 8)
    first = _prep(total_steps=5, warmup_steps=1)
    seen = lambdas(first, 3)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = _prep(total_steps=5, warmup_steps=1)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert seen + lambdas(resumed, 5) == expected
    assert {"warm", "iter", "total_step", "num_step"} <= set(resumed.state_dict())
    torch.testing.assert_close(resumed.norm2.running_var, full.norm2.running_var)


def test_fold_mid_ramp_is_exact_in_eval_and_refused_in_train_mode() -> None:
    m = _prep(total_steps=4)
    with torch.no_grad():
        m.norm2.alpha.fill_(0.3)
    for _ in range(2):
        m(X * 2.0 - 1.0)
    assert m.current_lambda() == 0.5 and not m.ramp_finished()
    with pytest.raises(RuntimeError, match=r"needs eval mode .*got train mode \(next lambda=0.5\)"):
        m.folded_affine()
    m.eval()
    fa = m.folded_affine()
    x = torch.randn(3, 4, 2, dtype=F64) * 3.0 + 1.0
    torch.testing.assert_close(X * fa.scale + fa.shift, m(X), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x * fa.scale + fa.shift, m(x), rtol=1e-12, atol=1e-12)
    assert (m(x) - m.norm1(x)).abs().max() > 0.1  # eval is RepBN only: the LayerNorm branch is not in it
    note = m.fold_note()
    assert note is not None and "ramp unfinished (warm=0, iter=2 of total_step=4, next training lambda=0.5)" in note
    m.train()
    for _ in range(2):
        m(X)
    assert m.ramp_finished() and m.eval().fold_note() is None


def test_prep_mask_excludes_padded_tokens_from_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 2, generator=g, dtype=F64)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    x[~mask] = 1e4  # padding that would dominate every statistic it entered
    padded, packed = _prep(total_steps=3), _prep(total_steps=3)
    for _ in range(2):  # lambda 1, then 2/3: the second output depends on the RepBN statistics
        y = padded(x, mask=mask)
        y_ref = packed(x[mask])  # the 5 valid tokens as an (N, C) batch, no padding at all
        torch.testing.assert_close(y[mask], y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded.norm2.running_mean, packed.norm2.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded.norm2.running_var, packed.norm2.running_var, rtol=1e-12, atol=1e-12)
    assert padded.norm2.running_var.max() < 10.0


def test_rms_norm_branch_and_two_dim_input() -> None:
    m = PRepBatchNorm(4, total_steps=1, norm1="rms_norm").train()
    assert isinstance(m.norm1, RMSNorm)
    x = torch.randn(6, 4)
    torch.testing.assert_close(m(x), m.norm1(x))  # lambda = 1 on the first forward


def test_norm1_without_eps_builds_and_norm1_eps_goes_to_norms_that_take_one() -> None:
    """DyT has no eps: PRepBN used to pass ``eps=`` to every norm1 and raised TypeError for it."""
    m = PRepBatchNorm(4, total_steps=1, norm1="dyt").train()
    assert isinstance(m.norm1, DyT)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(m(x), m.norm1(x))  # lambda = 1 on the first forward
    assert PRepBatchNorm(4).norm1.eps == 1e-6 and PRepBatchNorm(4, norm1_eps=1e-5).norm1.eps == 1e-5
    with pytest.raises(TypeError, match=r"norm1='dyt' takes no eps, so norm1_eps must be None, got 1e-05"):
        PRepBatchNorm(4, norm1="dyt", norm1_eps=1e-5)


def test_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"total_steps to be an int >= 0, got -3"):
        PRepBatchNorm(4, total_steps=-3)
    with pytest.raises(ValueError, match=r"decrement_every to be an int >= 1, got 0"):
        PRepBatchNorm(4, decrement_every=0)
    with pytest.raises(ValueError, match=r"expected channel_dim=-1, got 1"):
        PRepBatchNorm(4, channel_dim=1)
    with pytest.raises(ValueError, match=r"rep_batch_norm: given num_features=4 .*but got input of size \[2, 3, 5\]"):
        RepBatchNorm(4)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"expected more than 1 valid \(unmasked\) value per channel"):
        RepBatchNorm(4).train()(torch.randn(2, 3, 4), mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"needs eval mode"):
        RepBatchNorm(4).train().folded_affine()
