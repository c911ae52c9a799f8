"""What a run found: each arm's failure diagnosis read from its ``health`` rows, and the report's *Claims* and
*Diagnosis* sections.

An arm is flagged (over all its seeds and evals; thresholds are module constants):

* **saturated** when a bounded-nonlinearity norm saw at least :data:`SATURATED` of its inputs saturated at an eval
  (DyT: ``|αx| > 2``);
* **frozen** when at least :data:`FROZEN` of its parameter elements had an exactly zero gradient at every step of an
  eval interval;
* **exploding** when a block's output RMS (the residual stream) reached :data:`EXPLODING`; a unit-scale norm keeps
  its input's scale out of the forward, but a bounded one saturates long before that, and half precision overflows
  at 65504;
* **diverged** when a seed stopped on the divergence rule (its status row).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from normlab.lab.claims import ClaimResult, Comparison

__all__ = ["EXPLODING", "FROZEN", "SATURATED", "ArmDiagnosis", "claims_blocks", "diagnose", "diagnosis_blocks"]

SATURATED = 0.5
FROZEN = 0.5
EXPLODING = 100.0

Block = tuple[str, Any]


@dataclass
class ArmDiagnosis:
    """One arm's health over its seeds: the worst value of each measurement, the first eval step (per seed) at
    which it crossed its threshold, and the seeds that diverged or failed."""

    arm: str
    n_seeds: int = 0
    saturation: float = math.nan
    saturation_norm: str = ""
    saturated_from: dict[int, int] = field(default_factory=dict)
    frozen: float = math.nan
    frozen_from: dict[int, int] = field(default_factory=dict)
    frozen_names: list[str] = field(default_factory=list)
    hidden_rms_start: float = math.nan
    hidden_rms_peak: float = math.nan
    hidden_rms_block: int | None = None
    exploding_from: dict[int, int] = field(default_factory=dict)
    diverged: dict[int, int] = field(default_factory=dict)
    errors: list[int] = field(default_factory=list)

    def flags(self) -> list[str]:
        """The failures found, one sentence each (empty: none)."""
        out = []
        if self.saturated_from:
            out.append(f"saturated: {_pct(self.saturation)} of the inputs of `{self.saturation_norm}` saturate "
                       f"(|αx| > 2 for DyT), from step {_steps(self.saturated_from, self.n_seeds)}")
        if self.frozen_from:
            names = ", ".join(f"`{n}`" for n in self.frozen_names[:4])
            out.append(f"frozen: {_pct(self.frozen)} of the parameters had an exactly zero gradient at every step of "
                       f"an eval interval, from step {_steps(self.frozen_from, self.n_seeds)} (e.g. {names})")
        if self.exploding_from:
            out.append(f"exploding hidden state: block {self.hidden_rms_block} output RMS {self.hidden_rms_peak:.3g} "
                       f"(step 0: {self.hidden_rms_start:.3g}), from step "
                       f"{_steps(self.exploding_from, self.n_seeds)}")
        if self.diverged:
            out.append(f"diverged at step {_steps(self.diverged, self.n_seeds)}")
        if self.errors:
            out.append(f"failed with an error (seeds {sorted(self.errors)})")
        return out

    def evidence(self) -> str:
        """The flags, or the measured values when nothing crossed a threshold."""
        flags = self.flags()
        if flags:
            return "; ".join(flags)
        parts = []
        if math.isfinite(self.saturation):
            parts.append(f"saturation at most {_pct(self.saturation)}")
        if math.isfinite(self.frozen):
            parts.append(f"frozen parameters at most {_pct(self.frozen)}")
        if math.isfinite(self.hidden_rms_peak):
            parts.append(f"hidden-state RMS at most {self.hidden_rms_peak:.3g}")
        return "no failure detected" + (f" ({', '.join(parts)})" if parts else "")


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if math.isfinite(x) else "-"


def _steps(first: dict[int, int], n_seeds: int) -> str:
    """``"40"`` (every seed), ``"40 (1/2 seeds)"``, ``"20-40 (2/2 seeds)"``."""
    lo, hi = min(first.values()), max(first.values())
    span = str(lo) if lo == hi else f"{lo}-{hi}"
    return span if len(first) == n_seeds and lo == hi else f"{span} ({len(first)}/{n_seeds} seeds)"


def _health_row(d: ArmDiagnosis, r: dict[str, Any], seed_first: dict[tuple[str, int], int]) -> None:
    """Fold one ``health`` row into ``d``."""
    v, seed, step, metric = r.get("value"), r["seed"], r["step"], r["metric"]
    if v is None:
        return
    if metric == "saturation_max":
        if not v <= d.saturation:  # also replaces NaN
            d.saturation, d.saturation_norm = v, str(r.get("module", ""))
        if v >= SATURATED:
            seed_first[("sat", seed)] = min(seed_first.get(("sat", seed), step), step)
    elif metric == "frozen_fraction":
        if not v <= d.frozen:
            d.frozen, d.frozen_names = v, list(r.get("names", []))
        if v >= FROZEN:
            seed_first[("frz", seed)] = min(seed_first.get(("frz", seed), step), step)
    elif metric == "hidden_rms_max":
        if not v <= d.hidden_rms_peak:
            d.hidden_rms_peak, d.hidden_rms_block = v, r.get("block")
        if v >= EXPLODING:
            seed_first[("exp", seed)] = min(seed_first.get(("exp", seed), step), step)


def diagnose(rows: Sequence[dict[str, Any]], arms: Sequence[str], seeds: Sequence[int]) -> dict[str, ArmDiagnosis]:
    """Each arm's :class:`ArmDiagnosis` from a run's (deduplicated) rows."""
    out = {a: ArmDiagnosis(a, n_seeds=len(seeds)) for a in arms}
    firsts: dict[str, dict[tuple[str, int], int]] = {a: {} for a in arms}
    starts: dict[str, list[float]] = {a: [] for a in arms}
    for r in rows:
        d = out.get(r["arm"])
        if d is None:
            continue
        if r["kind"] == "health":
            _health_row(d, r, firsts[r["arm"]])
            if r["metric"] == "hidden_rms_max" and r["step"] == 0 and r.get("value") is not None:
                starts[r["arm"]].append(float(r["value"]))
        elif r["kind"] == "status" and r.get("status") == "diverged":
            d.diverged[r["seed"]] = r["step"]
        elif r["kind"] == "status" and r.get("status") == "error":
            d.errors.append(r["seed"])
    for arm, d in out.items():
        first = firsts[arm]
        d.saturated_from = {s: st for (k, s), st in first.items() if k == "sat"}
        d.frozen_from = {s: st for (k, s), st in first.items() if k == "frz"}
        d.exploding_from = {s: st for (k, s), st in first.items() if k == "exp"}
        d.hidden_rms_start = max(starts[arm]) if starts[arm] else math.nan
    return out


def _num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if math.isfinite(x) else "-"


def diagnosis_blocks(diagnoses: dict[str, ArmDiagnosis]) -> list[Block]:
    """The report's *Diagnosis* section: one row per arm."""
    table = [["arm", "saturation (worst norm)", "frozen parameters", "hidden-state RMS step 0 → peak (block)",
              "findings"]]
    for d in diagnoses.values():
        sat = f"{_pct(d.saturation)} `{d.saturation_norm}`" if math.isfinite(d.saturation) else "no bounded norm"
        rms = (f"{_num(d.hidden_rms_start)} → {_num(d.hidden_rms_peak)} (block {d.hidden_rms_block})"
               if math.isfinite(d.hidden_rms_peak) else "-")
        table.append([d.arm, sat, _pct(d.frozen), rms, "; ".join(d.flags()) or "none"])
    intro = (
        "Measured at every eval (worst over evals and seeds): the share of inputs that saturate a bounded norm "
        f"(DyT: |αx| > 2; flagged from {_pct(SATURATED)}), the share of parameter elements whose gradient was "
        f"exactly zero at every step of an eval interval (flagged from {_pct(FROZEN)}: the network is frozen), and "
        f"the largest RMS of a block's output (flagged from {EXPLODING:g}: exploding hidden state)."
    )
    return [("h2", "Diagnosis"), ("p", intro), ("table", table)]


def _diff_cell(c: Comparison) -> str:
    if c.verdict == "no data" or math.isnan(c.diff):
        return c.reason or "-"
    if math.isinf(c.diff):
        return f"{'+' if c.diff > 0 else '-'}∞ ({c.reason})"
    if math.isnan(c.spread):
        return f"{c.diff:+.4f} ({c.reason})"
    return f"{c.diff:+.4f} ± {c.spread:.4f}"


def _mean_cell(values: dict[int, float]) -> str:
    vals = list(values.values())
    if not vals:
        return "-"
    if any(math.isinf(v) for v in vals):
        return "diverged"
    mean = sum(vals) / len(vals)
    return f"{mean:.4f}"


def claims_blocks(results: list[ClaimResult], diagnoses: dict[str, ArmDiagnosis], z: float) -> list[Block]:
    """The report's *Claims* section: a row per comparison, the verdict rule, and for every claim that did not hold
    the diagnosis of the arms involved."""
    if not results:
        return []
    table = [["claim", "paper", "test", "metric", "mean a", "mean b", "a − b (± u)", "seeds a/b", "verdict"]]
    for res in results:
        c = res.claim
        for i, comp in enumerate(res.comparisons):
            first = i == 0
            verdict = comp.verdict + (f" ({comp.reason})" if comp.reason and math.isfinite(comp.spread) else "")
            verdict += f" (claim: {res.verdict})" if len(res.comparisons) > 1 else ""
            metric = c.metric + (f" ({c.layers} layers)" if c.layers != "all" else "")
            table.append([f"**{c.id}**: {c.text}" if first else "″", f"[{c.paper}]({c.url})" if first else "″",
                          c.statement(comp.a), metric, _mean_cell(comp.values_a), _mean_cell(comp.values_b),
                          _diff_cell(comp), f"{len(comp.values_a)}/{len(comp.values_b)}", verdict])
    rule = (
        f"Per comparison, d = mean(a) − mean(b) over seeds and u = {z:g}·sqrt(s_a²/n_a + s_b²/n_b) (s: sample std "
        "over seeds). `<` held when d + u < 0 and did not hold when d − u > 0; `>` the mirror image; `≈ (±m)` held "
        "when |d| + u < m and did not hold when |d| − u > m; anything else is not separable at this budget, as is "
        "a comparison with one seed. A diverged seed's loss counts as +∞. With two seeds this is a screen, not a "
        "significance test."
    )
    blocks: list[Block] = [("h2", "Claims"), ("p", rule), ("table", table)]
    failed = [r for r in results if r.verdict == "did not hold"]
    if failed:
        blocks.append(("h3", "Where a claim did not hold: what the lab measured"))
        items = []
        for res in failed:
            arms = [*res.claim.a, res.claim.b]
            evidence = "; ".join(f"{a}: {diagnoses[a].evidence()}" for a in arms if a in diagnoses)
            items.append(f"**{res.claim.id}** ({res.claim.statement()}): {evidence}")
        blocks.append(("ul", items))
    return blocks
