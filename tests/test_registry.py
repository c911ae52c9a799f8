"""Registry behaviour and registry <-> export consistency."""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest
import torch

import normlab
from normlab import registry
from normlab.nn._base import NormBase
from normlab.registry import get_norm, list_norms, register_norm, register_reference


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
    with pytest.raises(KeyError, match=r"available: (\w+, )*batch_norm, "):
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

        @register_norm("layer_norm", functional=None, layout="token")
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
        assert callable(spec.reference), f"{spec.name} has no float64 reference"  # a missing one raises KeyError
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
    optional = "('matplotlib', 'sklearn', 'transformers')"
    code = f"import sys, normlab; print(sorted(m for m in {optional} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_norm_class_in_normlab_nn_is_registered() -> None:
    """The namespaces are derived from the registry, so a norm class that forgot ``@register_norm`` would be missing
    from them silently: every public NormBase subclass defined in a module of normlab.nn must be registered."""
    registered = {s.cls for s in list_norms()}
    for info in pkgutil.iter_modules(normlab.nn.__path__, "normlab.nn."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == info.name and not name.startswith("_"):
                if issubclass(obj, NormBase) and obj is not NormBase:
                    assert obj in registered, f"{info.name}.{name} is a norm class but not registered"


def test_namespaces_are_exactly_the_registry_plus_the_non_norm_exports() -> None:
    classes = {s.cls.__name__ for s in list_norms()}
    ops = {s.functional.__name__ for s in list_norms() if s.functional is not None}
    assert set(normlab.nn.__all__) == classes | {"GroupScaling", "SigmaReparamLinear"}
    assert set(normlab.functional.__all__) == ops | {"group_scaling"}
    api = {"NormSpec", "Paper", "__version__", "create_norm", "diagnostics", "functional", "get_norm", "iter_norms",
           "list_norms", "models", "nn", "register_norm", "surgery", "tta", "weight"}
    assert set(normlab.__all__) == classes | api
    for module in (normlab, normlab.nn, normlab.functional):
        assert all(hasattr(module, name) for name in module.__all__), module.__name__
        assert len(module.__all__) == len(set(module.__all__)), module.__name__


def test_importing_normlab_does_not_import_the_references_until_one_is_used() -> None:
    code = (
        "import sys\n"
        "import normlab.nn\n"
        "assert 'normlab.testing' not in sys.modules, 'normlab.nn imported normlab.testing'\n"
        "import normlab\n"
        "spec = normlab.get_norm('rms_norm')\n"
        "assert 'normlab.testing' not in sys.modules, 'normlab imported normlab.testing'\n"
        "fn = spec.reference\n"
        "assert 'normlab.testing' in sys.modules\n"
        "print(fn.__module__, fn.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "normlab.testing.reference rms_norm"


def test_every_reference_is_found_by_name() -> None:
    assert get_norm("prms_norm").reference is get_norm("rms_norm").reference is get_norm("SRMSNorm").reference
    assert get_norm("batch_norm").reference.__name__ == "batch_norm"
    assert all(s.reference.__module__.startswith("normlab.testing.") for s in list_norms())


def test_temporary_registration_is_undone_and_can_be_replayed() -> None:
    before = [s.name for s in list_norms()]
    with registry.temporary() as toy:

        @register_norm("temp_norm", functional=None, layout="token", aliases=("tmp",))
        class TempNorm(NormBase):
            """A norm that exists for this test only."""

        @register_reference("tmp")
        def temp_reference(m: object, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return x.double()

        assert get_norm("TempNorm").reference is temp_reference
    assert [s.name for s in list_norms()] == before
    assert [s.name for s in toy.norms] == ["temp_norm"] and toy.references == {"temp_norm": temp_reference}
    for spelling in ("temp_norm", "tmp", TempNorm):
        with pytest.raises(KeyError, match="unknown norm 'temp_norm'|TempNorm is not a registered norm|'tmp'"):
            get_norm(spelling)
    with registry.temporary(toy):
        spec = get_norm("tmp")
        assert spec is toy.norms[0] and spec.cls is TempNorm and spec.reference is temp_reference
    assert [s.name for s in list_norms()] == before
    # An error inside the block undoes what the block registered as well.
    with pytest.raises(RuntimeError, match="boom"), registry.temporary():
        register_norm("temp_norm", functional=None, layout="token")(type("TempNorm2", (NormBase,), {}))
        raise RuntimeError("boom")
    assert [s.name for s in list_norms()] == before


def test_reference_errors_are_clear() -> None:
    with registry.temporary():

        @register_norm("no_ref_norm", functional=None, layout="token")
        class NoRefNorm(NormBase):
            """No reference."""

        with pytest.raises(KeyError, match=r"norm 'no_ref_norm' has no float64 reference; register one with "
                                           r"@register_reference\('no_ref_norm'\) in a module of normlab.testing"):
            _ = get_norm("no_ref_norm").reference
        with pytest.raises(KeyError, match=r"register_reference: unknown norm 'rms_nrom'; did you mean 'rms_norm'"):
            register_reference("rms_nrom")(lambda m, x, mask=None: x)
        with pytest.raises(ValueError, match=r"norm 'rms_norm' already has a float64 reference "
                                             r"\(normlab.testing.reference.rms_norm\)"):
            register_reference("RMSNorm")(lambda m, x, mask=None: x)
        with pytest.raises(TypeError, match="expected at least one norm name, got none"):
            register_reference()
        with pytest.raises(TypeError, match=r"expected norm names \(str\), got type"):
            register_reference(NoRefNorm)  # type: ignore[arg-type]


def test_a_reference_passed_to_register_norm_is_used() -> None:
    """Norms defined outside normlab may bring their reference to the registration instead."""

    def own(m: object, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x.double()

    with registry.temporary():

        @register_norm("own_ref_norm", functional=None, layout="token", reference=own)
        class OwnRefNorm(NormBase):
            """Brings its reference."""

        assert get_norm("own_ref_norm").reference is own
