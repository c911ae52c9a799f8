"""What the benchmark scripts share: OpenMP's wait policy, interleaved timing, p20/p50/p80 summaries of the
per-repetition times and ratios, the command-line options every script has, and the result directory with its
``env.json`` and ``rows.jsonl``.

A script imports this module before torch (see the comment at the wait policy).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any, TypeVar

# 2026-11: on this shared 2-core machine, 2 intra-op threads with OpenMP's default spin-waiting made a ViT-S forward
# 12x slower (1.5 s instead of 0.13 s) whenever another process held a core: every parallel region waited for the
# descheduled thread. Passive waiting removes that. It must be set before torch starts OpenMP, hence before the import;
# env.json records the value in force.
TORCH_PRELOADED = "torch" in sys.modules  # then the setting below comes too late (e.g. under pytest)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from normlab._env import collect_env  # noqa: E402
from normlab._io import append_jsonl, atomic_write_json  # noqa: E402  (the lab's row and env.json writers)

K = TypeVar("K", bound=Hashable)
QUANTILES = (20, 50, 80)


def time_ms(fn: Callable[[], object], inner: int) -> float:
    """Wall time of one of ``inner`` back-to-back calls of ``fn``, in ms (their mean)."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def inner_count(fn: Callable[[], object], sample_ms: float) -> int:
    """Warm ``fn`` up with one call, then how many calls make one timed sample last about ``sample_ms``."""
    time_ms(fn, 1)
    return max(1, int(round(sample_ms / max(time_ms(fn, 1), 1e-3))))


def message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def interleaved(
    calls: dict[K, Callable[[], object]], reps: int, sample_ms: float, *, rotate: bool = True,
    errors: dict[K, str] | None = None,
) -> tuple[dict[K, list[float]], dict[K, int]]:
    """``(samples, inner)``: every call warmed up and given its inner count (:func:`inner_count`), then ``reps``
    repetitions that time each call once, in an order rotated every repetition with ``rotate`` (round-robin
    without), so that drift on a shared machine hits all calls alike.

    With ``errors``, a call that raises is dropped, its message (:func:`message`) kept there, and the sweep goes on;
    without, the exception propagates.
    """
    calls = dict(calls)
    inner: dict[K, int] = {}
    for key, fn in list(calls.items()):
        try:
            inner[key] = inner_count(fn, sample_ms)
        except Exception as exc:
            if errors is None:
                raise
            errors[key] = message(exc)
            del calls[key]
    samples: dict[K, list[float]] = {k: [] for k in calls}
    for rep in range(reps):
        keys = list(calls)
        k = rep % max(len(keys), 1) if rotate else 0
        for key in keys[k:] + keys[:k]:
            try:
                samples[key].append(time_ms(calls[key], inner[key]))
            except Exception as exc:
                if errors is None:
                    raise
                errors[key] = message(exc)
                del calls[key], samples[key]
    return samples, inner


def percentiles(values: Iterable[float] | np.ndarray) -> tuple[float, float, float]:
    p20, p50, p80 = np.percentile(np.asarray(values), QUANTILES)
    return float(p20), float(p50), float(p80)


def summary(values: Iterable[float] | np.ndarray, key: str, digits: int) -> dict[str, float]:
    """The p20/p50/p80 of ``values`` rounded to ``digits``, under ``key`` with ``{p}`` filled in (``"{p}_ms"``:
    ``p20_ms``, ...)."""
    return {key.format(p=f"p{q}"): round(v, digits) for q, v in zip(QUANTILES, percentiles(values))}


def ratio_summary(ms: Iterable[float], base: Iterable[float] | None, key: str, digits: int) -> dict[str, Any]:
    """:func:`summary` of the per-repetition ratios ``ms / base`` (both timed in the same repetitions); ``None``
    values without a ``base``."""
    if base is None:
        return {key.format(p=f"p{q}"): None for q in QUANTILES}
    return summary(np.asarray(list(ms)) / np.asarray(list(base)), key, digits)


def parser(doc: str | None, *, quick: str, reps: str | None = None) -> argparse.ArgumentParser:
    """The options every script has: ``--reps``, ``--threads``, ``--quick`` (help ``quick``) and ``--out``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15, help=reps)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--out", type=Path, default=None, help="result dir (must not exist)")
    return p


def default_out(name: str) -> Path:
    return Path("benchmarks/results") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_env(out: Path, **fields: Any) -> None:
    """``out/env.json``: versions and machine (:func:`normlab._env.collect_env`), argv, threads, ``fields`` and the
    OpenMP wait policy in force."""
    env = collect_env() | {"argv": sys.argv, "threads": torch.get_num_threads(), **fields}
    env |= {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch_imported_before_script": TORCH_PRELOADED}
    atomic_write_json(out / "env.json", env)


RunCase = Callable[[str, dict[str, Any], int, int, int, float], list[dict[str, Any]]]


def model_sweep(argv: list[str] | None, doc: str | None, name: str, models: dict[str, dict[str, Any]],
                quick_models: dict[str, dict[str, Any]], variants: Any, run_case: RunCase, *, vocab: int,
                vocab_help: str, quick_vocab: int | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """The main of a benchmark over (model, batch) cases: parses ``argv`` (:func:`parser` plus ``--batches``,
    ``--models`` and ``--vocab``), makes the result directory ``name-<time>`` with its ``env.json``, and calls
    ``run_case(model name, a copy of its spec, batch, reps, vocab, sample_ms)`` for every case, appending each
    case's rows to ``rows.jsonl`` as soon as they are timed. Returns the directory and all rows."""
    p = parser(doc, quick="tiny models, batch 1 and 2, 3 repetitions",
               reps="interleaved repetitions per (model, batch)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--models", nargs="+", default=None, help=f"subset of {sorted(models)}")
    p.add_argument("--vocab", type=int, default=vocab, help=vocab_help)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = quick_models if args.quick else {k: models[k] for k in (args.models or models)}
    batches = [1, 2] if args.quick else args.batches
    reps = 3 if args.quick else args.reps
    vocab = quick_vocab if args.quick and quick_vocab is not None else args.vocab
    sample_ms = 5.0 if args.quick else 50.0
    out = args.out or default_out(name)
    out.mkdir(parents=True, exist_ok=False)
    config = {"models": chosen, "batches": batches, "reps": reps, "vocab": vocab, "variants": variants}
    write_env(out, config=config, seed=0)
    rows: list[dict[str, Any]] = []
    for model, spec in chosen.items():
        for batch in batches:
            print(f"timing {model} batch {batch} ...", file=sys.stderr, flush=True)
            case_rows = run_case(model, copy.deepcopy(spec), batch, reps, vocab, sample_ms)
            append_jsonl(out / "rows.jsonl", case_rows)
            rows += case_rows
    return out, rows
