"""Registry behaviour and registry <-> export consistency."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

import normlab
from normlab.nn._base import NormBase
from normlab.registry import get_norm, list_norms, register_norm


@pytest.mark.parametrize("name", ["RMSNorm", "rmsnorm", "rms_norm", "rms-norm", "RMS_NORM", "rms"])
def test_forgiving_names_resolve(name: str) -> None:
    assert get_norm(name).name == "rms_norm"


def test_class_and_partial_resolve() -> None:
    assert get_norm(normlab.LayerNorm).name == "layer_norm"
    m = normlab.create_norm(functools.partial(normlab.RMSNorm, eps=1e-3), 8)
    assert isinstance(m, normlab.RMSNorm) and m.eps == 1e-3
    m = normlab.create_norm(normlab.DyT, 8, alpha_init=0.2)
    assert isinstance(m, normlab.DyT) and m.alpha.item() == pytest.approx(0.2)


def test_unknown_name_suggests_and_lists() -> None:
    with pytest.raises(KeyError, match=r"unknown norm 'rms_nrom'; did you mean 'rms_norm'.*available: .*layer_norm"):
        get_norm("rms_nrom")
    with pytest.raises(KeyError, match=r"available: batch_norm"):
        get_norm("zzzz")


def test_wrong_types_and_traits() -> None:
    with pytest.raises(TypeError, match="expected a norm name"):
        get_norm(3)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="unknown trait 'fast'"):
        list_norms(fast=True)
    with pytest.raises(KeyError, match="is not a registered norm"):
        get_norm(torch.nn.Linear)


def test_list_norms_filters_by_traits() -> None:
    names = {s.name for s in list_norms(has_running_stats=True)}
    assert "batch_norm" in names and "layer_norm" not in names
    assert all(s.foldable for s in list_norms(foldable=True))
    assert len(list_norms()) >= 12


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered|already names"):

        @register_norm("layer_norm", functional=None, reference=None, layout="token")
        class Other(NormBase):
            pass


def test_every_registered_norm_is_exported_and_documented() -> None:
    for spec in list_norms():
        cls = spec.cls
        assert getattr(normlab, cls.__name__, None) is cls, f"{cls.__name__} is registered but not exported"
        assert cls.__name__ in normlab.__all__
        assert getattr(normlab.nn, cls.__name__, None) is cls
        doc = inspect.getdoc(cls) or ""
        assert "Args" in doc or spec.name == "identity", f"{cls.__name__} lacks an Args section"
        if spec.paper is not None:
            assert spec.paper.url.startswith("https://")
            module_doc = inspect.getmodule(cls).__doc__ or ""  # type: ignore[union-attr]
            assert spec.paper.url in module_doc or spec.paper.url in doc, f"{cls.__name__}: paper link undocumented"
        assert spec.reference is not None, f"{spec.name} has no float64 reference"
        assert spec.description


def test_every_exported_norm_class_is_registered() -> None:
    registered = {s.cls for s in list_norms()}
    for name in normlab.nn.__all__:
        obj = getattr(normlab.nn, name)
        if inspect.isclass(obj) and issubclass(obj, NormBase) and obj is not NormBase:
            assert obj in registered, f"normlab.nn.{name} is a norm but not registered"


def test_every_functional_op_is_exported_from_normlab_functional() -> None:
    """Registered <-> exported for the functional ops too: each norm's op lives in ``normlab.functional`` (under
    its own name), and every op exported there that carries a norm's name is some norm's registered op."""
    registered = {s.functional for s in list_norms() if s.functional is not None}
    for spec in list_norms():
        fn = spec.functional
        assert fn is not None, f"{spec.name} registers no functional op"
        assert fn.__name__ in normlab.functional.__all__, f"{spec.name}: {fn.__name__} not in normlab.functional"
        assert getattr(normlab.functional, fn.__name__) is fn
        assert fn.__module__.startswith("normlab.functional."), f"{spec.name}: op defined in {fn.__module__}"
    for name in normlab.functional.__all__:
        if name in {s.name for s in list_norms()}:
            assert getattr(normlab.functional, name) in registered, f"normlab.functional.{name} is no norm's op"


def test_import_needs_only_torch_and_numpy() -> None:
    import subprocess
    import sys

    optional = "('matplotlib', 'sklearn', 'transformers')"
    code = f"import sys, normlab; print(sorted(m for m in {optional} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
