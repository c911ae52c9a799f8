"""Hypothesis property tests for the laws the norms satisfy (STYLE.md: 'where a law exists')."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab import LayerNorm, RMSNorm, ScaleNorm, SRMSNorm

rows = st.integers(min_value=1, max_value=4)
widths = st.integers(min_value=2, max_value=16)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
scales = st.floats(min_value=1e-2, max_value=1e3)
shifts = st.floats(min_value=-1e3, max_value=1e3)


def _tokens(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + 0.1


@settings(max_examples=40, deadline=None)
@given(n=rows, d=widths, seed=seeds, a=scales, b=shifts)
def test_layer_norm_invariant_to_token_shift_and_scale(n: int, d: int, seed: int, a: float, b: float) -> None:
    m = LayerNorm(d, eps=0.0, dtype=torch.float64)
    x = _tokens(n, d, seed)
    per_token_a = torch.full((n, 1), a, dtype=torch.float64) * torch.arange(1, n + 1).reshape(n, 1)
    torch.testing.assert_close(m(per_token_a * x + b), m(x), rtol=1e-7, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(n=rows, d=widths, seed=seeds, a=scales)
def test_rms_norms_invariant_to_token_scale(n: int, d: int, seed: int, a: float) -> None:
    x = _tokens(n, d, seed)
    for m in (RMSNorm(d, eps=0.0, dtype=torch.float64), SRMSNorm(d, eps=0.0, dtype=torch.float64),
              ScaleNorm(d, eps=0.0, dtype=torch.float64)):
        torch.testing.assert_close(m(a * x), m(x), rtol=1e-9, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(d=widths, seed=seeds, b=st.floats(min_value=0.5, max_value=10))
def test_rms_norm_is_not_shift_invariant(d: int, seed: int, b: float) -> None:
    """The law must be able to fail: RMSNorm does not re-centre, so a shift changes the output."""
    x = _tokens(3, d, seed)
    m = RMSNorm(d, eps=0.0, dtype=torch.float64)
    assert not torch.allclose(m(x + b), m(x), atol=1e-6)
