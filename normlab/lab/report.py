"""Render a lab run to ``report.md`` and a self-contained ``report.html`` (plots embedded as base64 PNG).

The report is a pure function of the files in the run directory (``env.json``, ``rows.jsonl``), so an old run
re-renders identically. It holds: the set-up (suite, scale, config, versions, command), the summary table (final
validation loss mean ± std over seeds, the ranking, throughput), the suite's claims with a verdict each and, where
one did not hold, the diagnosis of its arms (:mod:`normlab.lab.findings`), the failure diagnosis of every arm,
notes for diverged / failed arms, loss curves with a band over seeds, throughput, and per-layer diagnostic curves.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.lab.claims import Z, evaluate_claims
from normlab.lab.config import ArmConfig, SuiteConfig, parse_suite
from normlab.lab.findings import claims_blocks, diagnose, diagnosis_blocks
from normlab.lab.schema import ROWS_FILE, read_rows, row_key

__all__ = ["ArmSummary", "RunData", "format_summary_table", "load_run", "render_report", "summarize"]

CAVEATS = (
    "Validation runs in eval mode: batch-statistic norms (BatchNorm, PowerNorm, UnifiedNorm, (P)RepBN) use their "
    "running statistics there. In training mode their batch statistics of a causal LM mix in future tokens of the "
    "other sequences of the batch, so their training loss is not a pure next-token loss; compare them on "
    "validation loss only.",
    "Throughput is training time only (no evaluation), measured on whatever machine ran the suite; on a shared "
    "machine absolute numbers drift between runs, so compare arms of one run (seeds are interleaved across arms).",
    "These are small models trained for few steps: differences below the seed spread are not evidence.",
)


@dataclass
class RunData:
    """The files of a run directory, parsed: ``env.json``, the suite config and the rows (deduplicated by key)."""

    run_dir: Path
    env: dict[str, Any]
    config: SuiteConfig
    rows: list[dict[str, Any]]
    duplicates: int = 0


@dataclass
class ArmSummary:
    """One arm over its seeds."""

    arm: str
    norm: str
    placement: str
    statuses: dict[int, str] = field(default_factory=dict)
    final: dict[int, float] = field(default_factory=dict)
    best: dict[int, float] = field(default_factory=dict)
    final_acc: dict[int, float] = field(default_factory=dict)
    final_metrics: dict[str, dict[int, float]] = field(default_factory=dict)  # the task's other eval metrics
    throughput: list[float] = field(default_factory=list)
    messages: dict[int, str] = field(default_factory=dict)
    rank: int | None = None

    @property
    def ok(self) -> bool:
        return bool(self.statuses) and all(s == "ok" for s in self.statuses.values())

    def mean_std(self, values: dict[int, float]) -> tuple[float, float]:
        vals = [v for v in values.values() if math.isfinite(v)]
        if not vals:
            return math.nan, math.nan
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; rows with the same key keep the last (a finished run has none twice)."""
    run_dir = Path(run_dir)
    env_path = run_dir / "env.json"
    if not env_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a lab run directory: {env_path} is missing")
    env = json.loads(env_path.read_text(encoding="utf-8"))
    cfg = parse_suite(env["config"], origin=str(env_path))
    rows, _ = read_rows(run_dir / ROWS_FILE)
    by_key: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        by_key[row_key(r)] = r
    return RunData(run_dir, env, cfg, list(by_key.values()), duplicates=len(rows) - len(by_key))


def _value(row: dict[str, Any]) -> float:
    v = row.get("value")
    return float(v) if v is not None else math.nan


def _resolved_model(cfg: SuiteConfig, arm: ArmConfig) -> dict[str, Any]:
    """The arm's model config with the model class's defaults filled in (for the norm / placement columns)."""
    from normlab.lab.config import model_config_class

    merged = cfg.arm_model(arm)
    try:
        return dict(model_config_class(cfg.task).from_dict(merged).to_dict())
    except (ValueError, TypeError, KeyError):
        return merged


def summarize(data: RunData) -> list[ArmSummary]:
    """Per-arm summaries in ranking order: arms whose seeds all finished ``ok`` by mean final validation loss, then
    the others (unranked) in suite order."""
    cfg = data.config
    out: dict[str, ArmSummary] = {}
    for arm in cfg.arms:
        model = _resolved_model(cfg, arm)
        out[arm.name] = ArmSummary(arm.name, str(model.get("norm", "-")), str(model.get("placement", "-")))
    last_eval: dict[tuple[str, int], int] = {}
    for r in data.rows:
        s = out.get(r["arm"])
        if s is None:
            continue
        seed = r["seed"]
        if r["kind"] == "status":
            s.statuses[seed] = r["status"]
            if r.get("message"):
                s.messages[seed] = r["message"]
        elif r["kind"] == "eval" and r["metric"] == "val_loss":
            v = _value(r)
            if r["step"] >= last_eval.get((r["arm"], seed), -1):
                last_eval[(r["arm"], seed)] = r["step"]
                s.final[seed] = v
            if math.isfinite(v):
                s.best[seed] = min(s.best.get(seed, math.inf), v)
        elif r["kind"] == "train" and r["metric"] == "throughput" and r.get("value") is not None:
            s.throughput.append(float(r["value"]))
    for r in data.rows:
        if r["kind"] == "eval" and r["metric"] != "val_loss" and r["arm"] in out:
            if last_eval.get((r["arm"], r["seed"])) == r["step"]:
                if r["metric"] == "val_acc":
                    out[r["arm"]].final_acc[r["seed"]] = _value(r)
                else:
                    out[r["arm"]].final_metrics.setdefault(r["metric"], {})[r["seed"]] = _value(r)
    for s in out.values():
        for seed, status in s.statuses.items():
            if status != "ok":
                s.final[seed] = math.nan  # a diverged / failed seed has no final loss
    ranked = sorted((s for s in out.values() if s.ok), key=lambda s: (s.mean_std(s.final)[0], s.arm))
    for i, s in enumerate(ranked):
        s.rank = i + 1
    return ranked + [s for s in out.values() if not s.ok]


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _summary_rows(data: RunData, summaries: list[ArmSummary]) -> list[list[str]]:
    cfg = data.config
    from normlab.lab.tasks import task_class

    task = task_class(cfg.task)
    classification = cfg.task == "digits"
    unit = task.unit
    extra = [m for m in task.eval_metrics if m not in ("val_loss", "val_acc")]
    header = ["rank", "arm", "norm", "placement", "seeds ok", "final val loss", "best val loss"]
    if classification:
        header.append("final val acc")
    header += [f"final {m.replace('_', ' ')}" for m in extra]
    header.append(f"{unit} p50")
    rows = [header]
    for s in summaries:
        n_ok = sum(1 for v in s.statuses.values() if v == "ok")
        state = f"{n_ok}/{len(cfg.seeds)}"
        bad = sorted({v for v in s.statuses.values() if v != "ok"})
        if bad:
            state += " (" + ", ".join(bad) + ")"
        elif len(s.statuses) < len(cfg.seeds):
            state += " (unfinished)"
        row = [str(s.rank) if s.rank else "-", s.arm, s.norm, s.placement if not classification else "-", state,
               _fmt(*s.mean_std(s.final)), _fmt(*s.mean_std(s.best))]
        if classification:
            row.append(_fmt(*s.mean_std(s.final_acc), digits=3))
        row += [_fmt(*s.mean_std(s.final_metrics.get(m, {})), digits=3) for m in extra]
        row.append(f"{statistics.median(s.throughput):,.0f}" if s.throughput else "-")
        rows.append(row)
    return rows


def format_summary_table(run_dir: str | Path) -> str:
    """The summary table as aligned plain text (what ``normlab lab`` prints at the end)."""
    data = load_run(run_dir)
    rows = _summary_rows(data, summarize(data))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- document model: a list of blocks rendered to both markdown and HTML ------------------------------------------

Block = tuple[str, Any]


def _plots(data: RunData, plot_dir: Path) -> list[tuple[str, str]]:
    """Draw every plot; returns ``[(file name, caption)]``."""
    from normlab.lab import plots

    cfg = data.config
    arms = [a.name for a in cfg.arms]
    out: list[tuple[str, str]] = []
    for kind, metric, title in (("eval", "val_loss", "validation loss"), ("train", "train_loss", "training loss")):
        series: dict[str, dict[int, list[float]]] = {a: {} for a in arms}
        for r in data.rows:
            if r["kind"] == kind and r["metric"] == metric and r["arm"] in series:
                series[r["arm"]].setdefault(r["step"], []).append(_value(r))
        name = f"{metric}.png"
        plots.plot_curves(series, plot_dir / name, title=f"{title} (mean over seeds, band: min-max)", ylabel=metric)
        out.append((name, f"{title} per arm; line = mean over seeds, band = min to max seed"))
    tput: dict[str, list[float]] = {a: [] for a in arms}
    for r in data.rows:
        if r["kind"] == "train" and r["metric"] == "throughput" and r.get("value") is not None and r["arm"] in tput:
            tput[r["arm"]].append(float(r["value"]))
    if any(tput.values()):
        unit = "samples/s" if cfg.task == "digits" else "tokens/s"
        plots.plot_throughput(tput, plot_dir / "throughput.png", unit=unit)
        out.append(("throughput.png", f"training throughput ({unit}) per arm"))
    diag: dict[str, dict[str, dict[int, dict[int, list[float]]]]] = {}
    for r in data.rows:
        if r["kind"] == "diag" and r.get("layer") is not None and r.get("value") is not None and r["arm"] in tput:
            per = diag.setdefault(r["metric"], {a: {} for a in arms})
            per[r["arm"]].setdefault(r["step"], {}).setdefault(int(r["layer"]), []).append(float(r["value"]))
    for metric in sorted(diag):
        means = {a: {st: {ell: statistics.fmean(v) for ell, v in layers.items()} for st, layers in by.items()}
                 for a, by in diag[metric].items()}
        name = "diag_" + "".join(c if c.isalnum() else "_" for c in metric) + ".png"
        positive = all(v > 0 for by in means.values() for layers in by.values() for v in layers.values())
        plots.plot_per_layer_arms(means, plot_dir / name, metric=metric,
                                  log_y=positive and metric.startswith(("hidden_variance", "hidden_rms")))
        out.append((name, f"diagnostic `{metric}` per layer (normlab.diagnostics), first and last recorded step"))
    return out


def _document(data: RunData, plot_files: list[tuple[str, str]]) -> list[Block]:
    cfg, env = data.config, data.env
    versions = env.get("env", {})
    summaries = summarize(data)
    blocks: list[Block] = [("h1", f"normlab lab report: {cfg.name}")]
    if cfg.description:
        blocks.append(("p", cfg.description))
    setup = [
        f"scale: `{cfg.scale}`; task: `{cfg.task}`; {len(cfg.arms)} arms × {len(cfg.seeds)} seeds {cfg.seeds}; "
        f"{cfg.steps} steps, "
        f"batch {cfg.batch_size}" + (f" × {cfg.seq_len} bytes" if cfg.task == "lm_stdlib" else " images")
        + f" per process, world size {env.get('world_size', 1)}",
        f"AdamW lr {cfg.lr:g} (betas {cfg.betas}, weight decay {cfg.weight_decay:g}), {cfg.warmup_of()} warmup "
        f"steps then cosine to {cfg.min_lr_ratio:g}×lr, grad clip {cfg.grad_clip:g}; eval every {cfg.eval_every} "
        f"steps; divergence: training or validation loss NaN/inf or > {cfg.divergence_factor:g}× the step-0 "
        "validation loss",
        f"base model: `{json.dumps(cfg.model, sort_keys=True)}`",
        f"created {env.get('created', '?')}; command `{' '.join(env.get('command', []))}`",
        f"normlab {versions.get('normlab', '?')}, torch {versions.get('torch', '?')}, Python "
        f"{versions.get('python', '?')}, git {versions.get('git_sha', '?')}; {versions.get('cpu', '?')} "
        f"({versions.get('cpu_count', '?')} CPUs, {versions.get('torch_threads', '?')} torch threads), "
        f"GPU {versions.get('gpu') or 'none'}",
    ]
    blocks += [("h2", "Set-up"), ("ul", setup)]
    blocks += [("h2", "Summary"), ("p", "Ranked by mean final validation loss over seeds (± sample std); arms with "
               "a diverged or failed seed are not ranked."), ("table", _summary_rows(data, summaries))]
    diagnoses = diagnose(data.rows, [a.name for a in cfg.arms], cfg.seeds)
    n_layers = {a.name: int(_resolved_model(cfg, a).get("n_layers", 0) or 0) for a in cfg.arms}
    blocks += claims_blocks(evaluate_claims(cfg, data.rows, n_layers), diagnoses, Z)
    blocks += diagnosis_blocks(diagnoses)
    arm_rows = [["arm", *[k for k in ("lr", "batch_size") if any(k in a.train for a in cfg.arms)], "overrides"]]
    for a in cfg.arms:
        arm_rows.append([a.name, *[str(a.train.get(k, "-")) for k in arm_rows[0][1:-1]],
                         f"`{json.dumps(a.model, sort_keys=True)}`"])
    blocks += [("h3", "Arms"), ("table", arm_rows)]
    per_seed = [["arm", *[f"seed {s}" for s in cfg.seeds]]]
    for s in summaries:
        per_seed.append([s.arm] + [
            (f"{s.final[k]:.4f}" if math.isfinite(s.final.get(k, math.nan)) else s.statuses.get(k, "missing"))
            for k in cfg.seeds
        ])
    blocks += [("h3", "Final validation loss per seed"), ("table", per_seed)]
    notes = [
        f"{s.arm} seed {k}: {s.statuses.get(k)}: {msg}" for s in summaries for k, msg in sorted(s.messages.items())
    ]
    if notes:
        blocks += [("h3", "Diverged or failed arms"), ("ul", notes)]
    if data.duplicates:
        blocks.append(("p", f"Note: rows.jsonl holds {data.duplicates} duplicate row key(s); the last was used."))
    blocks += [("h2", "Caveats"), ("ul", list(CAVEATS))]
    blocks.append(("h2", "Plots"))
    for name, caption in plot_files:
        blocks += [("img", (name, caption))]
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for kind, body in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + body)
        elif kind == "p":
            out.append(body)
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in body))
        elif kind == "table":
            head, *rest = body
            lines = ["| " + " | ".join(_md_cell(c) for c in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rest]
            out.append("\n".join(lines))
        elif kind == "img":
            name, caption = body
            out.append(f"![{caption}](plots/{name})\n\n*{caption}*")
    return "\n\n".join(out) + "\n"


_LINK = re.compile(r"\[([^\]]+)\]\((https?://[^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline_html(text: str) -> str:
    """Markdown's inline ``code``, **bold** and [links](https://...) as HTML; everything else escaped."""
    parts = html.escape(text, quote=False).split("`")
    out = []
    for i, p in enumerate(parts):
        if i % 2:
            out.append(f"<code>{p}</code>")
        else:
            p = _LINK.sub(lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', p)
            out.append(_BOLD.sub(r"<strong>\1</strong>", p))
    return "".join(out)


def _to_html(blocks: list[Block], plot_dir: Path, title: str) -> str:
    out = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
        "th{background:#f3f3f3}code{background:#f6f6f6}img{max-width:100%}</style></head><body>",
    ]
    for kind, body in blocks:
        if kind in ("h1", "h2", "h3", "p"):
            out.append(f"<{kind}>{_inline_html(body)}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in body) + "</ul>")
        elif kind == "table":
            head, *rest = body
            rows = ["<tr>" + "".join(f"<th>{_inline_html(c)}</th>" for c in head) + "</tr>"]
            rows += ["<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in rest]
            out.append("<table>" + "".join(rows) + "</table>")
        elif kind == "img":
            name, caption = body
            b64 = base64.b64encode((plot_dir / name).read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
                       f"<figcaption>{_inline_html(caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_report(run_dir: str | Path, *, plots: bool = True) -> Path:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into ``run_dir``; returns the path of ``report.md``.

    Args:
        run_dir: a lab run directory.
        plots: draw the PNG plots (needs matplotlib: ``pip install 'normlab[plot]'``); ``False`` writes the tables
            only.
    """
    data = load_run(run_dir)
    plot_dir = data.run_dir / "plots"
    plot_files = _plots(data, plot_dir) if plots else []
    blocks = _document(data, plot_files)
    md_path = data.run_dir / "report.md"
    md_path.write_text(_to_markdown(blocks), encoding="utf-8")
    (data.run_dir / "report.html").write_text(
        _to_html(blocks, plot_dir, f"normlab lab report: {data.config.name}"), encoding="utf-8"
    )
    return md_path
