"""Regression gate: a new sweep's results against a baseline's, point by point, with thresholds.

Points are matched by their identity (``topology_id`` + ``workload_id``), never by row order.
Per matched point and gated metric, each side's value is the **median over its ok repeats**,
reported with its spread (min–max, count). A metric's direction follows its name: throughputs
(``*_throughput``, ``*_goodput``, ``*_tok_s``, ``*_tok_s_per_gpu``…) are better higher,
latencies (``*_ms``) better lower.

A change counts as a regression when both hold (the **significance rule**):

1. the median moved the bad way by more than the threshold (``change < -t`` for a throughput,
   ``change > +t`` for a latency, ``change = new / baseline - 1``);
2. with ≥ 2 ok repeats on both sides, the two sides' ranges do not overlap (every new repeat is
   worse than every baseline repeat). That is the exact one-sided Mann–Whitney test at U = 0:
   if both sides came from one distribution, all of the new values land beyond all of the
   baseline's with probability ``1 / C(n_b + n_n, n_b)`` — 1/6 for 2 + 2 repeats, 1/20 for 3 + 3.

With a single ok repeat on either side, rule 1 alone decides. A change past the threshold whose
ranges overlap is reported as ``noise`` and does not fail the gate.

A point whose baseline repeats all ran ok and whose new run has a failed repeat is a regression
(verdict ``FAILED``). Points present on one side only are listed and fail the gate only with
``require_all``. Pure: no I/O except reading result folders through :func:`epkit.analysis.results.load`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from epkit.errors import EpkitError

HIGHER, LOWER = "higher", "lower"
POINT_KEY = ("topology_id", "workload_id")
# Used when no --max-regression is given: the CI user's usual worry, throughput down or tail latency up.
DEFAULT_THRESHOLDS = {"output_throughput": 0.05, "p99_ttft_ms": 0.10, "p99_itl_ms": 0.10}
_HIGHER_SUFFIXES = ("_throughput", "_goodput", "_tok_s")
_LATENCIES = ("ttft", "tpot", "itl", "e2el")
# Named in messages; any other result column whose name follows the direction rule is gated too.
KNOWN_METRICS = (
    "output_throughput", "total_token_throughput", "input_throughput", "request_throughput", "request_goodput",
    "output_tok_s_per_gpu", "total_tok_s_per_gpu", "input_tok_s_per_gpu",
    "interactivity_pareto_tok_s", "interactivity_inferencex_tok_s", "interactivity_mean_tpot_tok_s",
    *(f"{stat}_{lat}_ms" for lat in _LATENCIES for stat in ("mean", "median", "p50", "p90", "p99")),
)
THRESHOLD_FORM = "METRIC=P% (e.g. output_throughput=5%) or METRIC=F with 0 <= F < 1 (e.g. p99_ttft_ms=0.1)"

# verdicts
OK, IMPROVED, NOISE, REGRESSION, FAILED, MISSING = "ok", "improved", "noise", "REGRESSION", "FAILED", "missing"
FIXED, FAILED_BOTH = "fixed", "failed in both"


class GateError(EpkitError, ValueError):
    """Bad input to the gate: a threshold, a metric name, a results folder, no common points."""


def direction(metric: str) -> str | None:
    """``"higher"`` (throughputs), ``"lower"`` (``*_ms`` latencies) or None (not a gated metric)."""
    if metric.endswith("_ms"):
        return LOWER
    if metric.endswith(_HIGHER_SUFFIXES) or "_tok_s_per_" in metric:
        return HIGHER
    return None


@dataclass(frozen=True)
class Threshold:
    """The largest change of ``metric`` in its bad direction that still passes, as a fraction."""

    metric: str
    fraction: float

    def __post_init__(self):
        if direction(self.metric) is None:
            raise GateError(f"--max-regression metric {self.metric!r} is not a metric the gate knows; allowed: "
                            f"{', '.join(KNOWN_METRICS)} (and any result column ending in _ms — lower is better — "
                            "or in _throughput, _goodput, _tok_s — higher is better)")
        if not (math.isfinite(self.fraction) and self.fraction >= 0):
            raise GateError(f"--max-regression {self.metric}={self.fraction!r}: the threshold must be >= 0; "
                            f"allowed: {THRESHOLD_FORM}")

    @property
    def direction(self) -> str:
        return direction(self.metric)  # type: ignore[return-value]

    @property
    def text(self) -> str:
        return f"{'-' if self.direction == HIGHER else '+'}{_pct(self.fraction)}"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.4g}%"


def parse_threshold(text: str) -> Threshold:
    """``"output_throughput=5%"`` or ``"output_throughput=0.05"`` → :class:`Threshold`.

    A bare number must be below 1 (``5`` is refused: write ``5%``, or ``500%`` if meant)."""
    metric, sep, value = str(text).partition("=")
    metric, value = metric.strip(), value.strip()
    if not sep or not metric or not value:
        raise GateError(f"--max-regression {text!r}: expected {THRESHOLD_FORM}")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)", value)
    if not match:
        raise GateError(f"--max-regression {text!r}: threshold {value!r} is not a number; expected {THRESHOLD_FORM}")
    number = float(match.group(1))
    if match.group(2):
        return Threshold(metric, number / 100.0)
    if number >= 1:
        raise GateError(f"--max-regression {text!r}: a bare threshold is a fraction below 1 ({value} would allow "
                        f"{_pct(number)}); write {value}% if you mean percent. Expected {THRESHOLD_FORM}")
    return Threshold(metric, number)


def parse_thresholds(texts: Iterable[str] | None) -> list[Threshold]:
    """Every ``--max-regression``; :data:`DEFAULT_THRESHOLDS` when none. A metric given twice is an error."""
    texts = list(texts or [])
    if not texts:
        return [Threshold(m, f) for m, f in DEFAULT_THRESHOLDS.items()]
    out: dict[str, Threshold] = {}
    for text in texts:
        t = parse_threshold(text)
        if t.metric in out:
            raise GateError(f"--max-regression {t.metric} is given twice ({_pct(out[t.metric].fraction)} and "
                            f"{_pct(t.fraction)}); give each metric once")
        out[t.metric] = t
    return list(out.values())


@dataclass(frozen=True)
class Side:
    """One side of one point and metric: the median over ok repeats and its spread."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Side:
        vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if not vals:
            return cls(math.nan, math.nan, math.nan, 0)
        s = pd.Series(vals)
        return cls(float(s.median()), float(s.min()), float(s.max()), len(vals))


@dataclass(frozen=True)
class Verdict:
    """One row of the gate's table: a point and a metric (or the point's ``status``)."""

    point: str
    metric: str
    verdict: str
    baseline: Side | None = None
    new: Side | None = None
    change: float | None = None  # new / baseline - 1 of the medians
    threshold: Threshold | None = None
    p_value: float | None = None  # one-sided exact Mann–Whitney p when the ranges do not overlap (n >= 2 each)
    reason: str = ""

    @property
    def fails(self) -> bool:
        return self.verdict in (REGRESSION, FAILED)


@dataclass
class GateResult:
    """Every verdict, the points found on one side only, and notes (e.g. workloads that differ)."""

    verdicts: list[Verdict]
    only_baseline: list[str]
    only_new: list[str]
    matched: list[str]
    require_all: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.fails]

    @property
    def passed(self) -> bool:
        one_sided = bool(self.only_baseline or self.only_new) and self.require_all
        return not self.regressions and not one_sided

    def to_dict(self) -> dict:
        def plain(x):
            if isinstance(x, float):
                return None if math.isnan(x) else ("inf" if x == math.inf else "-inf" if x == -math.inf else x)
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            if isinstance(x, list):
                return [plain(v) for v in x]
            return x

        rows = []
        for v in self.verdicts:
            row = asdict(v)
            row["threshold"] = None if v.threshold is None else {"metric": v.threshold.metric,
                                                                  "fraction": v.threshold.fraction,
                                                                  "direction": v.threshold.direction}
            row["fails"] = v.fails
            rows.append(plain(row))
        return {"passed": self.passed, "regressions": len(self.regressions), "require_all": self.require_all,
                "matched": self.matched, "only_baseline": self.only_baseline, "only_new": self.only_new,
                "notes": self.notes, "verdicts": rows}


def load_side(source: str | Path, name: str) -> pd.DataFrame:
    """One side's results (a sweep's results folder, as ``epkit report`` reads it) — the only I/O here.
    ``name`` (BASELINE / NEW) goes into the error when the folder is missing or holds no results."""
    from epkit.analysis import results as R

    if not Path(source).exists():
        raise GateError(f"{name} {str(source)!r} does not exist; give a sweep's results folder (results/<sweep>)")
    try:
        return R.load(source)
    except FileNotFoundError as exc:
        raise GateError(f"{name} {str(source)!r}: {exc}") from exc


def point_id(topology_id: str, workload_id: str) -> str:
    return f"{topology_id}/{workload_id}"


def _points(df: pd.DataFrame, name: str) -> dict[str, pd.DataFrame]:
    """The frame's sweep points by id; rows without an id (plain bench files) are not points."""
    if df.empty or not all(c in df for c in POINT_KEY):
        return {}
    df = df[df["topology_id"].notna() & df["workload_id"].notna()]
    out = {}
    for (tid, wid), rows in df.groupby(list(POINT_KEY), sort=True):
        if "repeat" in rows and rows["repeat"].duplicated().any():
            sweeps = sorted(map(str, rows["sweep"].dropna().unique())) if "sweep" in rows else []
            raise GateError(f"{name} holds point {point_id(tid, wid)} more than once (sweeps: "
                            f"{', '.join(sweeps) or '?'}); give one sweep's results folder (results/<sweep>)")
        out[point_id(tid, wid)] = rows
    return out


def _is_ok(rows: pd.DataFrame) -> pd.Series:
    return rows["status"] == "ok" if "status" in rows else pd.Series(True, index=rows.index)


def _change(base: float, new: float) -> float:
    if base == 0:
        return 0.0 if new == 0 else math.copysign(math.inf, new)
    return new / base - 1.0


def judge(baseline: Side, new: Side, threshold: Threshold) -> tuple[str, float, float | None, str]:
    """The significance rule on one metric: (verdict, change, p, reason). See the module docstring."""
    if baseline.n == 0:
        return MISSING, math.nan, None, "no value on the baseline side"
    if new.n == 0:  # gated, measured before, gone now (renamed, or not reported): the gate cannot pass it
        return FAILED, math.nan, None, "the baseline has a value, the new run none"
    change = _change(baseline.median, new.median)
    worse = -change if threshold.direction == HIGHER else change  # > 0: moved the bad way
    if worse <= threshold.fraction:
        if -worse > threshold.fraction:
            return IMPROVED, change, None, ""
        return OK, change, None, ""
    if baseline.n >= 2 and new.n >= 2:
        overlap = (new.high >= baseline.low) if threshold.direction == HIGHER else (new.low <= baseline.high)
        if overlap:
            return NOISE, change, None, "past the threshold, but the repeats' ranges overlap"
        p = 1.0 / math.comb(baseline.n + new.n, baseline.n)
        return REGRESSION, change, p, f"ranges do not overlap (p = {p:.3g})"
    return REGRESSION, change, None, "one repeat on a side: the threshold alone decides"


def _status_verdict(pid: str, base: pd.DataFrame, new: pd.DataFrame) -> Verdict | None:
    base_failed, new_failed = int((~_is_ok(base)).sum()), int((~_is_ok(new)).sum())
    if not base_failed and not new_failed:
        return None

    def why(rows: pd.DataFrame) -> str:
        bad = rows[~_is_ok(rows)]
        kinds = sorted({str(k) for k in bad.get("failure_kind", pd.Series(dtype=object)).dropna()})
        first = bad["failure_message"].dropna().astype(str).head(1).tolist() if "failure_message" in bad else []
        text = f"{len(bad)} of {len(rows)} repeats failed" + (f" [{', '.join(kinds)}]" if kinds else "")
        return text + (f": {first[0][:160]}" if first else "")

    if new_failed and not base_failed:
        return Verdict(pid, "status", FAILED, reason="ok in baseline; new: " + why(new))
    if base_failed and not new_failed:
        return Verdict(pid, "status", FIXED, reason="baseline: " + why(base) + "; all ok in new")
    return Verdict(pid, "status", FAILED_BOTH, reason="baseline: " + why(base) + "; new: " + why(new))


def _workload_notes(pid: str, base: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    cols = sorted(c for c in set(base.columns) & set(new.columns)
                  if c.startswith("workload_") and c != "workload_repeats")
    differ = []
    for c in cols:
        b, n = set(base[c].dropna().astype(str)), set(new[c].dropna().astype(str))
        if b != n:
            differ.append(f"{c[len('workload_'):]} {'/'.join(sorted(b)) or '-'} vs {'/'.join(sorted(n)) or '-'}")
    return [f"{pid}: the workload differs between the sides ({'; '.join(differ)})"] if differ else []


def compare(baseline: pd.DataFrame, new: pd.DataFrame, thresholds: Sequence[Threshold] | None = None, *,
            require_all: bool = False, names: tuple[str, str] = ("BASELINE", "NEW")) -> GateResult:
    """Gate ``new`` against ``baseline`` (frames of :func:`epkit.analysis.results.load`): one :class:`Verdict`
    per matched point and threshold, plus a ``status`` verdict where repeats failed.

    Raises :class:`GateError` when the sides share no point (naming both sides' points) or a
    threshold's metric is in neither frame (naming the metrics they have)."""
    thresholds = list(thresholds) if thresholds is not None else parse_thresholds(None)
    base_points, new_points = _points(baseline, names[0]), _points(new, names[1])
    matched = sorted(set(base_points) & set(new_points))
    if not matched:
        def listing(points):
            return ", ".join(sorted(points)) or "none (no sweep points: results need topology_id and workload_id)"
        raise GateError(f"{names[0]} and {names[1]} have no point in common (points match by "
                        f"topology_id/workload_id). {names[0]}: {listing(base_points)}. "
                        f"{names[1]}: {listing(new_points)}")
    for t in thresholds:
        if t.metric not in baseline and t.metric not in new:
            have = sorted(c for c in set(baseline.columns) | set(new.columns)
                          if direction(c) and pd.api.types.is_numeric_dtype(
                              (baseline if c in baseline else new)[c]))
            raise GateError(f"--max-regression metric {t.metric!r} is in neither result set; metrics they have: "
                            f"{', '.join(have)}")
    verdicts: list[Verdict] = []
    notes: list[str] = []
    for pid in matched:
        base_rows, new_rows = base_points[pid], new_points[pid]
        notes += _workload_notes(pid, base_rows, new_rows)
        status = _status_verdict(pid, base_rows, new_rows)
        if status is not None:
            verdicts.append(status)
        base_ok, new_ok = base_rows[_is_ok(base_rows)], new_rows[_is_ok(new_rows)]
        if base_ok.empty or new_ok.empty:
            continue  # nothing to compare: the status verdict says why
        for t in thresholds:
            b = Side.of(base_ok[t.metric].tolist() if t.metric in base_ok else [])
            n = Side.of(new_ok[t.metric].tolist() if t.metric in new_ok else [])
            verdict, change, p, reason = judge(b, n, t)
            verdicts.append(Verdict(pid, t.metric, verdict, b, n, None if math.isnan(change) else change, t, p,
                                    reason))
    return GateResult(verdicts, sorted(set(base_points) - set(new_points)), sorted(set(new_points) - set(base_points)),
                      matched, require_all, notes)


def gate(baseline_dir: str | Path, new_dir: str | Path, thresholds: Sequence[Threshold] | None = None, *,
         require_all: bool = False) -> GateResult:
    """:func:`compare` on two results folders (read with :func:`epkit.analysis.results.load`)."""
    base = load_side(baseline_dir, "BASELINE")
    new = load_side(new_dir, "NEW")
    return compare(base, new, thresholds, require_all=require_all,
                   names=(f"BASELINE {str(baseline_dir)!r}", f"NEW {str(new_dir)!r}"))


# ---- the table ---------------------------------------------------------------------------------
def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"


def _side_text(s: Side | None) -> str:
    if s is None or s.n == 0:
        return "-"
    if s.n == 1:
        return _num(s.median)
    return f"{_num(s.median)} [{_num(s.low)}-{_num(s.high)}] x{s.n}"


def _change_text(change: float | None) -> str:
    if change is None or math.isnan(change):
        return "-"
    if math.isinf(change):
        return "+inf%" if change > 0 else "-inf%"
    return f"{change * 100:+.1f}%"


def format_table(result: GateResult) -> str:
    """The verdicts as a plain aligned table, then one-sided points, notes and the summary line.
    Sides show ``median [min-max] xN`` when a point has several ok repeats."""
    header = ("point", "metric", "baseline", "new", "change", "threshold", "verdict")
    rows = [(v.point, v.metric, _side_text(v.baseline), _side_text(v.new), _change_text(v.change),
             v.threshold.text if v.threshold else "-", v.verdict + (f" — {v.reason}" if v.reason else ""))
            for v in result.verdicts]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    right = {2, 3, 4, 5}

    def line(r):
        cells = [r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i]) for i in range(len(widths))]
        return "  ".join(cells + [r[-1]]).rstrip()

    out = [line(header), line(tuple("-" * len(h) for h in header[:-1]) + ("-" * len(header[-1]),))]
    out += [line(r) for r in rows]
    tag = " (fails with --require-all)" if result.require_all else ""
    if result.only_baseline:
        out.append(f"only in BASELINE{tag}: {', '.join(result.only_baseline)}")
    if result.only_new:
        out.append(f"only in NEW{tag}: {', '.join(result.only_new)}")
    out += [f"note: {n}" for n in result.notes]
    out.append(summary(result))
    return "\n".join(out)


def summary(result: GateResult) -> str:
    """``gate: PASS — …`` or ``gate: FAIL — …`` naming every failing point and metric."""
    compared = sum(1 for v in result.verdicts if v.threshold is not None and v.verdict != MISSING)
    noise = sum(1 for v in result.verdicts if v.verdict == NOISE)
    head = f"{len(result.matched)} matched point(s), {compared} comparison(s)" + (
        f", {noise} within noise" if noise else "")
    if result.passed:
        return f"gate: PASS — {head}, no regression"
    fails = [f"{v.metric} at {v.point}" for v in result.regressions]
    if result.require_all:
        fails += [f"{p} only in BASELINE" for p in result.only_baseline]
        fails += [f"{p} only in NEW" for p in result.only_new]
    return f"gate: FAIL — {head}; {len(fails)} failing: {'; '.join(fails)}"

