"""The stdlib byte corpus: file-level split determinism, caching, window sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from normlab.data import load_stdlib_corpus, random_windows, stdlib_files, strided_windows
from normlab.data.text import SEPARATOR, _is_val


def _tree(root: Path) -> dict[str, bytes]:
    files = {f"pkg/mod{i}.py": f"x = {i}\nprint('module {i}')\n".encode() for i in range(12)}
    files["a.py"] = b"import os\n"
    files["site-packages/third_party.py"] = b"not stdlib\n"
    files["notes.txt"] = b"not python\n"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_stdlib_files_sorted_and_site_packages_excluded(tmp_path: Path) -> None:
    _tree(tmp_path)
    files = stdlib_files(tmp_path)
    assert files == sorted(files)
    assert "a.py" in files and "pkg/mod3.py" in files
    assert not any("site-packages" in f or f.endswith(".txt") for f in files)


def test_split_is_by_file_hash_deterministic_and_complete(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    a = load_stdlib_corpus(root=tmp_path / "src", cache=tmp_path / "c1", val_fraction=0.4)
    b = load_stdlib_corpus(root=tmp_path / "src", cache=tmp_path / "c2", val_fraction=0.4)
    assert a.val_files == b.val_files and a.train_files == b.train_files
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert set(a.val_files).isdisjoint(a.train_files)
    assert set(a.val_files) | set(a.train_files) == set(stdlib_files(tmp_path / "src"))
    assert a.val_files and a.train_files
    assert all(_is_val(f, 0.4) for f in a.val_files) and not any(_is_val(f, 0.4) for f in a.train_files)
    # every file's bytes appear exactly once, in sorted order, joined by the separator
    expected = bytes([SEPARATOR]).join(files[f] for f in a.train_files)
    assert a.train.tobytes() == expected and a.train.dtype == np.uint8


def test_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path: Path) -> None:
    _tree(tmp_path / "src")
    cache = tmp_path / "cache"
    load_stdlib_corpus(root=tmp_path / "src", cache=cache, val_fraction=0.4)
    npys = sorted(cache.glob("*.npy"))
    assert len(npys) == 2
    stamps = [p.stat().st_mtime_ns for p in npys]
    again = load_stdlib_corpus(root=tmp_path / "src", cache=cache, val_fraction=0.4)
    assert [p.stat().st_mtime_ns for p in npys] == stamps  # read back, not rebuilt
    assert isinstance(again.train, np.memmap)
    (tmp_path / "src" / "a.py").write_bytes(b"import sys  # changed\n")
    changed = load_stdlib_corpus(root=tmp_path / "src", cache=cache, val_fraction=0.4)
    assert len(list(cache.glob("*.npy"))) == 4  # a new fingerprint, a new cache entry
    assert b"changed" in changed.train.tobytes() + changed.val.tobytes()


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path / "src")
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "envcache"))
    load_stdlib_corpus(root=tmp_path / "src", val_fraction=0.4)
    assert len(list((tmp_path / "envcache").glob("stdlib-*.npy"))) == 2


def test_bad_arguments_name_the_parameter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"val_fraction in \(0, 1\), got 1.5"):
        load_stdlib_corpus(val_fraction=1.5, cache=tmp_path)
    with pytest.raises(FileNotFoundError, match="expected root to be a directory"):
        stdlib_files(tmp_path / "missing")
    data = np.arange(10, dtype=np.uint8)
    with pytest.raises(ValueError, match="longer than seq_len=16"):
        random_windows(data, 16, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="batch_size to be an int >= 1, got 0"):
        random_windows(data, 4, 0, np.random.default_rng(0))


def test_windows_are_seeded_and_in_range() -> None:
    data = np.arange(1000, dtype=np.int64).astype(np.uint8)
    a = random_windows(data, 16, 4, np.random.default_rng(7))
    b = random_windows(data, 16, 4, np.random.default_rng(7))
    c = random_windows(data, 16, 4, np.random.default_rng(8))
    assert a.shape == (4, 16) and str(a.dtype) == "torch.int64"
    assert (a == b).all() and not (a == c).all()
    assert ((a[:, 1:] - a[:, :-1]) % 256 == 1).all()  # contiguous windows
    s = strided_windows(data, 16, 5)
    assert s.shape == (5, 16) and (s == strided_windows(data, 16, 5)).all()


def test_cache_files_are_written_through_unique_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cache file (arrays and the file index) goes through its own temporary file in the cache directory, so
    the ranks of a torchrun job building the same cache never write into one shared temporary file."""
    import os

    import normlab.data._cache as cache_mod

    _tree(tmp_path / "src")
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        replaced.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", spy)
    cache = tmp_path / "cache"
    for _ in range(2):  # two builders of the same cache entry, one after the other
        for p in cache.glob("stdlib-*"):
            p.unlink()
        load_stdlib_corpus(root=tmp_path / "src", cache=cache, val_fraction=0.4)
    targets = sorted({Path(dst).name for _, dst in replaced})
    assert len(targets) == 3 and any(t.endswith("-files.json") for t in targets)  # train, val and the index
    temps = [src for src, _ in replaced]
    assert len(temps) == 6 and len(set(temps)) == 6  # never the same temporary name twice
    assert all(Path(t).parent == cache for t in temps)  # same directory: os.replace stays atomic
    assert not list(cache.glob("*.tmp"))
