"""The Triton kernels (the CUDA implementation of the ``normlab::`` ops), run by Triton's interpreter on CPU tensors.

Triton picks its interpreter from ``TRITON_INTERPRET=1`` when ``@triton.jit`` functions are defined, its own
``triton.language`` ones (``tl.sum``, ...) included, i.e. at ``import triton``: setting it inside a test is too late
once anything (torch.compile probes for Triton) has imported it. So tests/conftest.py sets it before any import, and
the fixture checks it took effect (with ``TRITON_INTERPRET=0`` and a GPU these tests run on the GPU). No GPU is
needed. Small shapes: the interpreter runs each program in Python.

Triton is in the ``dev`` extra on Linux (the only platform with Triton wheels), so there a missing Triton fails these
tests; elsewhere they skip. Tolerances: those of tests/kernels/test_ops.py against the float64 reference.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch

from normlab.kernels import _triton, ops
from tests._extras import require
from tests.kernels._cases import CASE_IDS, by_id, make_inputs, run, run_ref
from tests.kernels.test_ops import BWD_TOL, FWD_TOL, _compare

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Triton 3.9's interpreter converts float32 to bfloat16 by truncation (its _convert_float gets no rounding mode), a GPU
# rounds to nearest: under the interpreter a bfloat16 result may be one ulp (2^-7) off instead of half an ulp, twice
# for the fused add's output (h is rounded before it is normalised).
INTERPRETED_BF16_TOL = 2**-6
# The rows past a backward block's end are masked out; the interpreter (numpy) still evaluates their 0/0 statistics.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")


@pytest.fixture
def device() -> Iterator[str]:
    """Where the kernels run: ``"cpu"`` under Triton's interpreter, else a CUDA device."""
    if sys.platform != "linux":
        pytest.skip("Triton publishes wheels for Linux only; the dev extra installs it there")
    require("triton", "dev")
    if _triton._interpreting():
        yield "cpu"
    elif torch.cuda.is_available():
        yield "cuda"
    else:
        pytest.fail("TRITON_INTERPRET is off and there is no GPU: nothing can run the Triton kernels "
                    "(tests/conftest.py sets TRITON_INTERPRET=1 unless the environment sets it)")


@pytest.mark.parametrize("shape", [(3, 7, 40), (37, 5)], ids=["40wide", "37rows-5wide"])  # masked tails
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_matches_float64_reference(device: str, case_id: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    case = by_id(case_id)
    x = (torch.randn(*shape) * 2 + 0.5).to(dtype)
    p = make_inputs(case, x)
    got = run(case, x.to(device), {k: v.to(device) for k, v in p.items()}, "triton")
    got = tuple(o.cpu() for o in got[0]), {k: v.cpu() if v is not None else None for k, v in got[1].items()}
    fwd, bwd = FWD_TOL[dtype], BWD_TOL[dtype]
    if dtype == torch.bfloat16 and device == "cpu":
        fwd = bwd = INTERPRETED_BF16_TOL
    _compare(case, x, got, run_ref(case, x, p), fwd, bwd)
    for name, g in got[1].items():
        assert g is not None and g.dtype == (x if name == "x" else p[name]).dtype, name


def test_parameter_gradients_are_deterministic(device: str) -> None:
    x = torch.randn(70, 24, device=device)  # 4 row blocks, the last one partly masked
    w = torch.randn(24, device=device)
    g = torch.randn(70, 24, device=device)
    first = _triton.ln_bwd(g, x, w, None, 1e-5, True, True)
    again = _triton.ln_bwd(g, x, w, None, 1e-5, True, True)
    for a, c in zip(first, again):
        assert torch.equal(a, c)
    assert _triton._blocks(70) == (4, 18)


def test_empty_input_and_float64_fall_back(device: str) -> None:
    empty = torch.randn(0, 8, requires_grad=True, device=device)
    y = ops.rms_norm(empty, 8, torch.ones(8, device=device), impl="triton")
    assert y.shape == (0, 8)
    y.sum().backward()
    x64 = torch.randn(4, 8, dtype=torch.float64, device=device)
    assert not _triton.supports(x64)  # float64 runs the composite body: the kernels compute in float32
    torch.testing.assert_close(ops.layer_norm(x64, 8, impl="triton"), ops.layer_norm(x64, 8, impl="composite"))


def test_triton_needs_a_cuda_input_outside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_triton, "available", lambda: True)
    monkeypatch.setattr(_triton, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"rms_norm: impl='triton' needs an input on a CUDA device, got .* on cpu"):
        ops.rms_norm(torch.randn(2, 4), 4, impl="triton")
    monkeypatch.setattr(_triton, "available", lambda: False)
    with pytest.raises(RuntimeError, match=r"dyt: impl='triton' needs Triton .*not installed"):
        ops.dyt(torch.randn(2, 4), 4, torch.ones(1), impl="triton")
