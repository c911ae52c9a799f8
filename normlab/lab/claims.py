"""Claims: what a suite's papers say about its arms, as data, checked against the run's rows.

A suite lists its claims in ``[[claims]]`` tables::

    [[claims]]
    id = "peri_le_pre"
    text = "Peri-LN trains to a loss at most Pre-LN's"
    paper = "Kim et al. 2025, Peri-LN: Revisiting Layer Normalization in the Transformer Architecture"
    url = "https://arxiv.org/abs/2502.02732"
    a = "peri"              # an arm, or a list of arms that must each stand in `relation` to b
    relation = "less"       # less | greater | equivalent
    b = "pre"
    metric = "final_val_loss"

Metrics (:data:`METRICS`): ``final_val_loss`` and ``best_val_loss`` (a diverged seed counts as +∞: worse than any
finite loss), ``final_val_acc`` (classification tasks; a diverged seed counts as -∞), ``final_<m>`` for any other
eval metric ``m`` the task reports (e.g. ``final_shift_acc``, ``final_val_psnr``; a diverged seed counts as -∞ for a
name ending in ``_acc`` or listed in the task's ``higher_is_better``, +∞ otherwise), and ``diag:<metric>`` for a
per-layer diagnostic the suite records (``diag:angular_distance:all_tokens``): its value at the last step it was
recorded, averaged over the claim's ``layers`` (``all``, ``deep`` = blocks ℓ > L/2, ``shallow`` = ℓ ≤ L/2, or a list
of layer indices); a seed that did not finish has no value. A seed that raised an error has no value for any metric.
``eval:<name>`` is the last value of any eval metric the task records in the suite (``Task.claim_metrics``, e.g.
``eval:err_tbn_iid_b64_s5`` of the ``tta`` task); a seed that did not finish has no value.

``b_metric`` (optional) reads ``b`` on another metric than ``a``: then ``a`` and ``b`` may be the same arm, and a
claim compares two metrics of one arm (``a = b = "bn"``, ``metric = "eval:err_tent_iid_b64_s5"``, ``b_metric =
"eval:err_source_iid_b64_s5"``). Both must be final metrics (not ``diag:``).

Verdict rule (:func:`compare`). Per comparison of arm ``a`` with arm ``b``: ``d = mean_a - mean_b`` over their
seeds, and the uncertainty ``u = Z · sqrt(s_a²/n_a + s_b²/n_b)`` with ``s`` the sample std over seeds and ``Z = 2``
(about a 95% interval for a normal mean difference). Then

* ``less``: **held** when ``d + u < 0``, **did not hold** when ``d - u > 0``;
* ``greater``: **held** when ``d - u > 0``, **did not hold** when ``d + u < 0``;
* ``equivalent`` (margin ``m``): **held** when ``|d| + u < m``, **did not hold** when ``|d| - u > m``;
* otherwise **not separable** at this budget. With fewer than two seeds on a side there is no spread: **not
  separable**, unless a side diverged (an infinite loss decides on its own). An arm without any value gives **no
  data**.

A claim with several ``a`` arms did not hold if any comparison did not hold, held if all held, and is not separable
otherwise. The rule is a screen, not a significance test: with two seeds the spread itself is uncertain, so a
verdict from two seeds says the difference is large against the spread seen, no more.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from normlab.lab.config import SuiteConfig

__all__ = [
    "CLAIM_KEYS",
    "METRICS",
    "RELATIONS",
    "VERDICTS",
    "Z",
    "ClaimConfig",
    "ClaimResult",
    "Comparison",
    "arm_values",
    "compare",
    "evaluate_claims",
    "parse_claims",
]

RELATIONS = ("less", "greater", "equivalent")
VERDICTS = ("held", "did not hold", "not separable", "no data")
METRICS = ("final_val_loss", "best_val_loss", "final_val_acc")  # and diag:<metric>
LAYER_SETS = ("all", "deep", "shallow")
Z = 2.0
CLAIM_KEYS = ("id", "text", "paper", "url", "a", "relation", "b", "metric", "b_metric", "margin", "layers")
_SYMBOL = {"less": "<", "greater": ">", "equivalent": "≈"}


@dataclass
class ClaimConfig:
    """One claim (see the module docstring); ``a`` is always a list here (a single arm in TOML is allowed)."""

    id: str
    text: str
    paper: str
    url: str
    a: list[str]
    relation: str
    b: str
    metric: str = "final_val_loss"
    margin: float | None = None
    layers: str | list[int] = "all"
    b_metric: str | None = None

    @property
    def metric_b(self) -> str:
        """The metric read for ``b``: ``b_metric``, else ``metric``."""
        return self.b_metric if self.b_metric is not None else self.metric

    def to_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(getattr(self, k)) for k in CLAIM_KEYS}
        out["a"] = self.a[0] if len(self.a) == 1 else list(self.a)
        return {k: v for k, v in out.items() if v is not None}

    def statement(self, a: str | None = None) -> str:
        """``"peri < pre"``, ``"dyt ≈ layer_norm (±0.05)"``: the comparison as a formula."""
        left = a if a is not None else " and ".join(self.a)
        margin = f" (±{self.margin:g})" if self.relation == "equivalent" else ""
        if self.b_metric is not None:  # two metrics: name them
            return f"{left}[{self.metric}] {_SYMBOL[self.relation]} {self.b}[{self.b_metric}]{margin}"
        return f"{left} {_SYMBOL[self.relation]} {self.b}{margin}"


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _metric_problem(metric: Any, cfg: SuiteConfig, eval_metrics: tuple[str, ...]) -> str | None:
    if not isinstance(metric, str):
        return f"metric: expected a string, got {metric!r}"
    if metric.startswith("diag:"):
        base = metric[len("diag:"):].split(":")[0]
        if base not in cfg.diagnostics or not cfg.diagnostics_at:
            return (f"metric {metric!r}: the suite does not record diagnostic {base!r} (diagnostics = "
                    f"{cfg.diagnostics}, diagnostics_at = {cfg.diagnostics_at})")
        return None
    if metric.startswith("eval:"):
        if metric[len("eval:"):] not in eval_metrics:
            return f"metric {metric!r}: the task records no eval metric {metric[len('eval:'):]!r} in this suite"
        return None
    known = [m for m in METRICS if m != "final_val_acc" or "val_acc" in eval_metrics]
    known += [f"final_{m}" for m in eval_metrics if f"final_{m}" not in METRICS]  # a task's extra eval metrics
    if metric not in known:
        return f"metric: unknown metric {metric!r}; expected one of {known}, 'eval:<metric>' or 'diag:<diagnostic>'"
    return None


def _layers_problem(value: Any, metric: Any) -> str | None:
    ok = value in LAYER_SETS or (
        isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                  for v in value))
    if not ok:
        return f"layers: expected one of {LAYER_SETS} or a non-empty list of layer indices >= 0, got {value!r}"
    if value != "all" and not (isinstance(metric, str) and metric.startswith("diag:")):
        return f"layers: only a 'diag:' metric is per layer, got layers={value!r} with metric {metric!r}"
    return None


def _claim_problems(raw: dict[str, Any], cfg: SuiteConfig, eval_metrics: tuple[str, ...]) -> list[str]:
    """Every problem of one ``[[claims]]`` table (without its position prefix)."""
    problems = [f"unknown key {k!r}; a claim takes {list(CLAIM_KEYS)}" for k in raw if k not in CLAIM_KEYS]
    for key in ("text", "paper", "url"):
        if not _nonempty_str(raw.get(key)):
            problems.append(f"{key}: expected a non-empty string, got {raw.get(key)!r}")
    if _nonempty_str(raw.get("url")) and not str(raw["url"]).startswith(("https://", "http://")):
        problems.append(f"url: expected an http(s) link to the paper, got {raw['url']!r}")
    arms = [a.name for a in cfg.arms]
    a = raw.get("a")
    a_list = [a] if isinstance(a, str) else a
    if not isinstance(a_list, list) or not a_list or not all(isinstance(x, str) for x in a_list):
        problems.append(f"a: expected an arm name or a non-empty list of arm names, got {a!r}")
        a_list = []
    for name in [*a_list, raw.get("b")]:
        if name not in arms:
            problems.append(f"unknown arm {name!r}; the suite has {arms}")
    b_metric = raw.get("b_metric")
    if raw.get("b") in a_list and (b_metric is None or b_metric == raw.get("metric", "final_val_loss")):
        problems.append(f"a and b: arm {raw.get('b')!r} is compared with itself on the same metric")
    relation = raw.get("relation")
    if relation not in RELATIONS:
        problems.append(f"relation: expected one of {RELATIONS}, got {relation!r}")
    margin = raw.get("margin")
    if relation == "equivalent":
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < math.inf:
            problems.append(f"margin: an 'equivalent' claim needs a number > 0, got {margin!r}")
    elif margin is not None:
        problems.append(f"margin: only an 'equivalent' claim has a margin, got margin={margin!r} with "
                        f"relation {relation!r}")
    metric = raw.get("metric", "final_val_loss")
    problem = _metric_problem(metric, cfg, eval_metrics)
    problems += [problem] if problem else []
    if b_metric is not None:
        problem = _metric_problem(b_metric, cfg, eval_metrics)
        problems += [f"b_{problem}" if problem.startswith("metric") else problem] if problem else []
        if isinstance(b_metric, str) and b_metric.startswith("diag:") or str(metric).startswith("diag:"):
            problems.append(f"b_metric: only a pair of final metrics may differ, got metric={metric!r} and "
                            f"b_metric={b_metric!r}")
    problem = _layers_problem(raw.get("layers", "all"), metric)
    return problems + ([problem] if problem else [])


def parse_claims(raw: Any, cfg: SuiteConfig, eval_metrics: tuple[str, ...]) -> tuple[list[ClaimConfig], list[str]]:
    """Validate a suite's ``claims`` list against its arms, diagnostics and the task's metrics (``eval_metrics``);
    returns the valid claims and every problem (``claims[i] (id): ...``)."""
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], [f"claims: expected a list of [[claims]] tables, got {type(raw).__name__}"]
    claims: list[ClaimConfig] = []
    problems: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            problems.append(f"claims[{i}]: expected a table, got {type(item).__name__}")
            continue
        cid = item.get("id")
        if not isinstance(cid, str) or not cid or not all(c.isalnum() or c in "-_." for c in cid):
            found = [f"id: expected a non-empty string of letters, digits, '-_.'; got {cid!r}"]
        else:
            found = [f"id: duplicate claim id {cid!r}"] if cid in seen else []
            seen.add(cid)
        found += _claim_problems(item, cfg, eval_metrics)
        problems += [f"claims[{i}] ({cid}): {p}" for p in found]
        if not found:
            a = item["a"]
            claims.append(ClaimConfig(
                id=str(cid), text=item["text"], paper=item["paper"], url=item["url"], a=[a] if isinstance(a, str) else
                list(a), relation=item["relation"], b=item["b"], metric=item.get("metric", "final_val_loss"),
                margin=float(item["margin"]) if item.get("margin") is not None else None,
                layers=copy.deepcopy(item.get("layers", "all")), b_metric=item.get("b_metric")))
    return claims, problems


# -- evaluation -------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """One arm of a claim against its reference: per-seed values, the difference and its uncertainty, the verdict."""

    a: str
    b: str
    values_a: dict[int, float]
    values_b: dict[int, float]
    diff: float
    spread: float
    verdict: str
    reason: str = ""


@dataclass
class ClaimResult:
    claim: ClaimConfig
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        verdicts = [c.verdict for c in self.comparisons]
        if "did not hold" in verdicts:
            return "did not hold"
        if verdicts and all(v == "held" for v in verdicts):
            return "held"
        if verdicts and all(v == "no data" for v in verdicts):
            return "no data"
        return "not separable"


def _mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    vals = list(values)
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan), len(vals)


def compare(values_a: dict[int, float], values_b: dict[int, float], relation: str, margin: float | None = None,
            a: str = "a", b: str = "b") -> Comparison:
    """Apply the verdict rule of the module docstring to the per-seed values of two arms."""
    if not values_a or not values_b:
        missing = " and ".join(n for n, v in ((a, values_a), (b, values_b)) if not v)
        return Comparison(a, b, values_a, values_b, math.nan, math.nan, "no data", f"no value for {missing}")
    inf_a = any(math.isinf(v) for v in values_a.values())
    inf_b = any(math.isinf(v) for v in values_b.values())
    if inf_a or inf_b:
        if inf_a and inf_b:
            return Comparison(a, b, values_a, values_b, math.nan, math.nan, "not separable", "both diverged")
        d = statistics.fmean(values_a.values()) - statistics.fmean(values_b.values())  # +-inf: one side's inf
        held = {"less": d < 0, "greater": d > 0, "equivalent": False}[relation]
        return Comparison(a, b, values_a, values_b, d, math.nan, "held" if held else "did not hold",
                          f"{a if inf_a else b} diverged")
    mean_a, sd_a, n_a = _mean_sd(values_a.values())
    mean_b, sd_b, n_b = _mean_sd(values_b.values())
    d = mean_a - mean_b
    if n_a < 2 or n_b < 2:
        return Comparison(a, b, values_a, values_b, d, math.nan, "not separable", "one seed: no spread")
    u = Z * math.sqrt(sd_a**2 / n_a + sd_b**2 / n_b)
    if relation == "less":
        verdict = "held" if d + u < 0 else "did not hold" if d - u > 0 else "not separable"
    elif relation == "greater":
        verdict = "held" if d - u > 0 else "did not hold" if d + u < 0 else "not separable"
    else:
        m = float(margin if margin is not None else 0.0)
        verdict = "held" if abs(d) + u < m else "did not hold" if abs(d) - u > m else "not separable"
        if verdict == "did not hold":  # which way: "DyT is worse than LN" and "DyT beats LN" are different news
            return Comparison(a, b, values_a, values_b, d, u, verdict, f"{a} {'higher' if d > 0 else 'lower'}")
    return Comparison(a, b, values_a, values_b, d, u, verdict)


def _selected_layers(layers: str | list[int], n_layers: int) -> set[int] | None:
    if layers == "all":
        return None
    if layers == "deep":
        return {ell for ell in range(1, n_layers + 1) if ell > n_layers / 2}
    if layers == "shallow":
        return {ell for ell in range(1, n_layers + 1) if ell <= n_layers / 2}
    return {int(ell) for ell in layers}


def arm_values(rows: list[dict[str, Any]], arm: str, metric: str, *, statuses: dict[int, str],
               layers: str | list[int] = "all", n_layers: int = 0, higher_is_better: bool | None = None
               ) -> dict[int, float]:
    """The per-seed value of ``metric`` for ``arm`` (see the module docstring for each metric and for seeds that
    diverged or failed); ``higher_is_better`` (default: a metric ending in ``_acc``) makes a diverged seed -∞."""
    higher = metric.endswith("_acc") if higher_is_better is None else higher_is_better
    out: dict[int, float] = {}
    mine = [r for r in rows if r["arm"] == arm]
    for seed, status in statuses.items():
        seed_rows = [r for r in mine if r["seed"] == seed]
        if status == "error":
            continue
        if metric.startswith("diag:"):
            if status != "ok":
                continue
            name, keep = metric[len("diag:"):], _selected_layers(layers, n_layers)
            diag = [r for r in seed_rows if r["kind"] == "diag" and r["metric"] == name and r.get("value") is not None
                    and r.get("layer") is not None and (keep is None or int(r["layer"]) in keep)]
            if diag:
                last = max(r["step"] for r in diag)
                out[seed] = statistics.fmean(float(r["value"]) for r in diag if r["step"] == last)
            continue
        if metric.startswith("eval:"):  # the last recorded value; a seed that did not finish has none
            evals = sorted((r["step"], r.get("value")) for r in seed_rows
                           if r["kind"] == "eval" and r["metric"] == metric[len("eval:"):])
            if status == "ok" and evals and evals[-1][1] is not None:
                out[seed] = float(evals[-1][1])
            continue
        if status != "ok":
            out[seed] = -math.inf if higher else math.inf
            continue
        name = "val_loss" if metric == "best_val_loss" else metric[len("final_"):]
        evals = sorted((r["step"], r.get("value")) for r in seed_rows if r["kind"] == "eval" and r["metric"] == name)
        finite = [float(v) for _, v in evals if v is not None and math.isfinite(float(v))]
        if evals and finite:
            last = evals[-1][1]
            out[seed] = min(finite) if metric == "best_val_loss" else float(last) if last is not None else math.nan
    return {k: v for k, v in out.items() if not math.isnan(v)}


def evaluate_claims(cfg: SuiteConfig, rows: list[dict[str, Any]], n_layers: dict[str, int] | None = None
                    ) -> list[ClaimResult]:
    """Every claim of ``cfg`` evaluated on ``rows`` (deduplicated run rows); ``n_layers`` gives each arm's block
    count for the ``deep`` / ``shallow`` layer sets."""
    from normlab.lab.tasks import task_class

    higher = task_class(cfg.task).higher_is_better
    statuses: dict[str, dict[int, str]] = {}
    for r in rows:
        if r["kind"] == "status":
            statuses.setdefault(r["arm"], {})[r["seed"]] = r["status"]
    results = []
    for claim in cfg.claims:
        result = ClaimResult(claim)
        for a in claim.a:
            va, vb = (arm_values(rows, arm, metric, statuses=statuses.get(arm, {}), layers=claim.layers,
                                 n_layers=(n_layers or {}).get(arm, 0),
                                 higher_is_better=metric.endswith("_acc") or metric.removeprefix("final_") in higher)
                      for arm, metric in ((a, claim.metric), (claim.b, claim.metric_b)))
            result.comparisons.append(compare(va, vb, claim.relation, claim.margin, a, claim.b))
        results.append(result)
    return results
