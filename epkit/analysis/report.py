"""``epkit report``: one self-contained HTML page for a results folder.

The page holds the sweep's table (one row per stored result, failures with their message)
and the figures of :mod:`epkit.analysis.plots`: the Pareto frontier, throughput and latency against
load, TTFT/ITL CDFs and a per-topology comparison. Results that compare prefill/decode
configurations (a ``pd`` column: colocated, 1P1D…) also get the P/D figure (p99 TTFT against p99
ITL, one point per configuration and load, colocated as the reference) and the table of SLA
attainment per configuration and load (:mod:`epkit.analysis.sla`; limits from ``slos_ms``, the
same table for any results when limits are given). plotly.js is inlined once, so the page
opens offline and makes no network request.
"""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from epkit.analysis import a2a as A2A
from epkit.analysis.assets import shared_plotly_js
from epkit.analysis import plots as P
from epkit.analysis import results as R
from epkit.analysis import sla as SLA

SLA_COLUMNS = ["pd", "topology", "load", "repeat", "requests", "good", "ttft_attainment", "tpot_attainment", "e2el_attainment",
               "sla_attainment", "request_goodput", "request_throughput", *SLA.SHOWN_METRICS, "source"]
TABLE_COLUMNS = ["config", "status", "gpus", "output_throughput", "output_tok_s_per_gpu", "total_tok_s_per_gpu",
                 "interactivity_pareto_tok_s", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_itl_ms",
                 "p99_itl_ms", "mean_prefill_ms", "mean_kv_transfer_ms", "completed", "failed", "failure_message", "hardware", "git_commit", "source"]

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px auto; max-width: 1280px; color: #222; }
h1 { margin-bottom: 4px; } .meta { color: #666; margin-top: 0; }
.figure { border: 1px solid #e4e4e4; border-radius: 6px; margin: 18px 0; padding: 6px; }
table { border-collapse: collapse; font-size: 12px; width: 100%; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
th { background: #f3f3f3; position: sticky; top: 0; }
td:first-child, td:last-child { text-align: left; }
tr.failed td { background: #fff0f0; }
.scroll { overflow-x: auto; max-height: 520px; }
"""


def figures(runs: pd.DataFrame, reqs: pd.DataFrame | None = None, color: str | None = None,
            x: str = "interactivity_pareto_tok_s", y: str = "output_tok_s_per_gpu",
            slos_ms: dict[str, float] | None = None) -> dict[str, go.Figure]:
    """The report's figures, by heading, for a frame :func:`epkit.analysis.results.load` built (and its
    request frame, for the CDFs)."""
    a2a_rows, runs = A2A.split(runs)  # epkit a2a-bench points have their own figures (docs/a2a_bench.md)
    out: dict[str, go.Figure] = A2A.figures(a2a_rows)
    ok = runs[runs["status"] == "ok"]
    if not len(ok):
        return out
    if SLA.has_pd(ok) and {"p99_ttft_ms", "p99_itl_ms"} <= set(ok):
        out["P/D: TTFT vs ITL"] = P.pd_latency(ok, slos_ms=slos_ms)
    out["Pareto frontier"] = P.pareto(ok, x=x, y=y, color=color)
    out["Throughput vs load"] = P.metric_vs_load(ok, y=y)
    out["TTFT vs load"] = P.metric_vs_load(ok, y="p99_ttft_ms" if "p99_ttft_ms" in ok else "median_ttft_ms")
    out["TPOT vs load"] = P.metric_vs_load(ok, y="median_tpot_ms")
    if reqs is not None and len(reqs):
        top = reqs[reqs["source"].isin(R.heaviest_load(ok)["source"])]  # one curve per topology
        top = top.assign(configuration=top["topology"] + " | " + top["load"])  # repeats pooled
        out["TTFT CDF"] = P.latency_cdf(top, "ttft_ms", color="configuration",
                                        heading="TTFT CDF (each topology at its heaviest load)")
        out["ITL CDF"] = P.latency_cdf(top, "itl_ms", color="configuration",
                                       heading="ITL CDF (each topology at its heaviest load)")
    out["Comparison"] = P.compare_bars(ok, y=y, x="topology", color="load",
                                       heading=f"{P.title(y)} by topology and load (bars: mean over repeats; whiskers: min–max)")
    return out


def _height(fig: go.Figure, width_px: int = 1150, row_px: int = 19) -> int:
    """460 px, plus room for the legend rows below the plot beyond the first two (a legend
    entry is about 7 px a character plus 50 px for its line; rows are ``width_px`` wide)."""
    names = [t.name or "" for t in fig.data if t.showlegend is not False and fig.layout.showlegend is not False]
    rows = -(-sum(7 * len(n) + 50 for n in names) // width_px) if names else 0
    return 460 + row_px * max(0, rows - 2)


def _table(runs: pd.DataFrame, columns: list[str] = TABLE_COLUMNS) -> str:
    cols = [c for c in columns if c in runs and runs[c].notna().any()]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = []
    for _, r in runs.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                text = "" if pd.isna(v) else f"{v:.4g}"
            else:
                text = "" if v is None else str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        cls = ' class="failed"' if r.get("status") != "ok" else ""
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _sla_section(runs: pd.DataFrame, reqs: pd.DataFrame, slos_ms: dict[str, float] | None) -> str:
    """The SLA attainment table, with the limits it was computed for and where they came from."""
    table = SLA.attainment(runs, reqs, slos_ms)
    limits = SLA.DEFAULT_SLOS_MS if slos_ms is None else slos_ms
    said = ", ".join(f"{k.upper()} ≤ {v:g} ms" for k, v in limits.items())
    origin = ("the defaults (MLPerf's Llama-2-70B server limits; epkit report --slo ttft=…,tpot=… sets others)"
              if slos_ms is None else "epkit report --slo")
    note = (f'<p class="meta">Limits: {html.escape(said)}, from {html.escape(origin)}. A request meets the SLA '
            "when it succeeded and meets every limit (vllm bench serve --goodput); attainment = such requests ÷ "
            "requests sent; request_goodput = such requests ÷ the point's duration (req/s). From each point's "
            "stored requests table.</p>")
    if not len(table):
        return "<h2>SLA attainment</h2>" + note + "<p>No stored requests table to compute it from.</p>"
    names = R.short_labels(runs[runs["status"] == "ok"], "topology")  # the full name is in the Results table
    table = table.assign(status="ok", topology=[names.get(t, t) for t in table["topology"]])
    return "<h2>SLA attainment</h2>" + note + _table(table, SLA_COLUMNS)


def render(source: str | Path | Iterable[str | Path], title: str | None = None, color: str | None = None,
           x: str = "interactivity_pareto_tok_s", y: str = "output_tok_s_per_gpu",
           slos_ms: dict[str, float] | None = None, plotly_src: str | None = None) -> str:
    """The report page for every result under ``source``, as one HTML string. ``slos_ms`` (keys
    ttft, tpot, e2el) are the limits of the SLA attainment table, shown for P/D results and
    whenever limits are given. ``plotly_src``: load plotly.js from this (relative) path instead of
    inlining it (see :func:`write`)."""
    runs = R.load(source)
    reqs = R.requests(runs)
    figs = figures(runs, reqs, color=color, x=x, y=y, slos_ms=slos_ms or SLA.DEFAULT_SLOS_MS)
    sources = [str(source)] if isinstance(source, (str, Path)) else [str(s) for s in source]
    n_failed = int((runs["status"] != "ok").sum())
    sweeps = sorted({str(s) for s in runs["sweep"].dropna()}) if "sweep" in runs else []
    meta = (f"{len(runs)} result(s) from {html.escape(', '.join(sources))}"
            + (f" · sweep(s): {html.escape(', '.join(sweeps))}" if sweeps else "")
            + (f" · <b>{n_failed} failed</b>" if n_failed else "")
            + f" · generated {_dt.datetime.now().isoformat(timespec='seconds')}")
    parts = [f"<h1>{html.escape(title or 'epkit report')}</h1>", f'<p class="meta">{meta}</p>']
    for i, (heading, fig) in enumerate(figs.items()):
        body = fig.to_html(full_html=False, include_plotlyjs=False, config=P.show_config(),
                           div_id=f"fig-{i}", default_height=f"{_height(fig)}px")
        parts.append(f'<h2>{html.escape(heading)}</h2><div class="figure">{body}</div>')
    if (slos_ms is not None or SLA.has_pd(runs)) and (runs["status"] == "ok").any():
        parts.append(_sla_section(runs, reqs, slos_ms))
    parts.append("<h2>Results</h2>" + _table(runs))
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title or 'epkit report')}</title><style>{_CSS}</style>"
            + (f"<script type=\"text/javascript\" src=\"{html.escape(plotly_src)}\"></script></head>" if plotly_src else
               f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head>")
            + f"<body>{''.join(parts)}</body></html>\n")


def write(source: str | Path | Iterable[str | Path], out: str | Path, plotly_js: str | Path | None = None,
          **kwargs) -> Path:
    """Write :func:`render`'s page to ``out`` and return its path. ``plotly_js``: a file to hold plotly.js (written
    when missing or different) that the page loads by a path relative to ``out`` - for many reports kept together
    (a repository's results), one 4.6 MB copy instead of one per page; the page opens offline while that file sits
    where the path points. Default: plotly.js inlined, a page that works alone."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    src = shared_plotly_js(plotly_js, out) if plotly_js is not None else None
    out.write_text(render(source, plotly_src=src, **kwargs), encoding="utf-8")
    return out
