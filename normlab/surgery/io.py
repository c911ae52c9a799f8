"""Model directories written by ``normlab convert`` (and :func:`save`): a manifest ``normlab.json`` next to the model,
and :func:`load`, which rebuilds the ``nn.Module`` from them.

Two formats, named by the manifest's ``format``:

* ``"hf"``: a plain Hugging Face directory (``save_pretrained``) whose model class is the original one, loadable
  without normlab; :func:`load` calls ``transformers.<architecture>.from_pretrained``.
* ``"normlab"``: the rewritten module itself, pickled with ``torch.save`` to ``model.pt`` (the surgeries put normlab
  modules into foreign classes and change shapes, so no class's ``from_pretrained`` describes the result); the manifest
  records its SHA-256, which :func:`load` checks before unpickling. Unpickling runs code: load only directories you
  trust, as with any ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normlab._env import collect_env, installed_version
from normlab._io import atomic_write, atomic_write_json

__all__ = ["MANIFEST", "load", "read_manifest", "save"]

MANIFEST = "normlab.json"
MODEL_FILE = "model.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, Any]:
    """The versions a manifest records."""
    env = collect_env()
    out = {k: env.get(k) for k in ("normlab", "torch", "python", "git_sha")}
    out["transformers"] = installed_version("transformers")
    return out


def save(model: nn.Module, directory: str | Path, *, manifest: dict[str, Any] | None = None, hf: bool = False) -> Path:
    """Write ``model`` and ``normlab.json`` into ``directory`` (created; must not exist).

    Args:
        model: the module to save.
        directory: the new directory.
        manifest: fields to record (what was done, verification numbers); ``format``, ``architecture``, ``versions``,
            ``created`` and ``files`` are added.
        hf: save with the model's own ``save_pretrained`` (a Hugging Face model whose classes are unchanged) instead
            of pickling it.

    Returns:
        The directory.

    Raises:
        FileExistsError: ``directory`` exists. TypeError: ``hf=True`` for a model without ``save_pretrained``.
    """
    out = Path(directory)
    if out.exists():
        raise FileExistsError(f"save: {out} exists; choose a new directory")
    if hf and not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"save: hf=True needs a model with save_pretrained, got {type(model).__name__}")
    out.mkdir(parents=True)
    record = dict(manifest or {})
    record |= {
        "format": "hf" if hf else "normlab",
        "architecture": type(model).__name__,
        "module": type(model).__module__,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if hf:
        model.save_pretrained(out)  # type: ignore[operator]
    else:
        atomic_write(out / MODEL_FILE, lambda f: torch.save(model, f))
        record["files"] = {MODEL_FILE: _sha256(out / MODEL_FILE)}
    atomic_write_json(out / MANIFEST, record)
    return out


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The ``normlab.json`` of ``directory``.

    Raises:
        FileNotFoundError: no manifest. ValueError: not a JSON object with a ``format``.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"load: expected {path} (a directory written by normlab convert or normlab.surgery.save)"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") not in ("hf", "normlab"):
        raise ValueError(f"load: {path} has no format 'hf' or 'normlab'")
    return data


def load(directory: str | Path) -> nn.Module:
    """Rebuild the model of a directory written by ``normlab convert`` or :func:`save`, in eval mode.

    Raises:
        FileNotFoundError: no manifest or model file. ValueError: a model file whose SHA-256 is not the manifest's.
        ImportError: an ``"hf"`` directory without ``transformers`` installed.
    """
    d = Path(directory)
    manifest = read_manifest(d)
    if manifest["format"] == "hf":
        import transformers

        cls = getattr(transformers, manifest["architecture"], None)
        if cls is None:
            raise ValueError(f"load: transformers has no class {manifest['architecture']!r} (recorded in {MANIFEST})")
        return cls.from_pretrained(d).eval()  # type: ignore[no-any-return]
    path = d / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"load: expected {path}")
    want = manifest.get("files", {}).get(MODEL_FILE)
    if want != _sha256(path):
        raise ValueError(f"load: {path} does not match the SHA-256 in {MANIFEST}; refusing to unpickle it")
    model = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(model, nn.Module):
        raise ValueError(f"load: {path} holds a {type(model).__name__}, not an nn.Module")
    return model.eval()
