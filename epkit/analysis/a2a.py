"""``epkit a2a-bench`` results: stored points, the tidy frame, the latency figure and an offline report page.

A point is one (backend, ranks, routing, dtype, device, tokens per rank) measurement of MoE dispatch + combine
(docs/a2a_bench.md), stored by ``epkit a2a-bench`` like a sweep's point (``<results>/<topology_id>/<workload_id>.json``: metrics at
the top level, ``"epkit"["point"]`` with status, topology, workload, hardware and git commit), so
:func:`epkit.analysis.results.load` reads it into a row; :func:`load` keeps those rows. The figure
draws from that frame only: latency against tokens per rank, log-log, one colour per backend.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from epkit.analysis import results as R

BENCHMARK = "a2a"  # the ``benchmark`` key of every point ``epkit a2a-bench`` writes (epkit/cli/a2a_bench.py)
# Topology fields of a point: what varies between curves.
CURVE = ["all2all_backend", "ep_size", "routing", "zipf_exponent", "dtype", "device", "model", "hidden_size",
         "top_k", "num_experts"]
METRICS = ["median_latency_us", "p99_latency_us", "mean_latency_us", "min_latency_us", "max_latency_us",
           "alg_bytes", "bus_bytes", "algbw_gbs", "busbw_gbs", "link_gbps", "link_fraction", "identity_ok",
           "identity_max_abs_err", "expert_load_imbalance"]
TABLE_COLUMNS = ["config", "status", "tokens_per_rank", "median_latency_us", "p99_latency_us", "algbw_gbs",
                 "busbw_gbs", "link_fraction", "alg_bytes", "bus_bytes", "expert_load_imbalance", "identity_ok",
                 "failure_message", "device_name", "git_commit", "source"]
TITLES = {"median_latency_us": "Median latency of dispatch + combine (µs)",
          "p99_latency_us": "p99 latency of dispatch + combine (µs)", "tokens_per_rank": "Tokens per rank",
          "algbw_gbs": "Algorithm bandwidth (GB/s)", "busbw_gbs": "Bus bandwidth (GB/s)",
          "link_fraction": "Fraction of the physical link (bus bandwidth ÷ link)"}


def rows(frame: pd.DataFrame) -> pd.Series:
    """Which rows of a :func:`epkit.analysis.results.load` frame are microbenchmark points."""
    if "benchmark" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["benchmark"] == BENCHMARK


def split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(microbenchmark rows, every other row) of a results frame."""
    mask = rows(frame)
    return frame[mask], frame[~mask]


def _varying(frame: pd.DataFrame, cols: list[str]) -> list[str]:
    """The columns of ``cols`` whose value differs between rows (missing counts as a value)."""
    return [c for c in cols if c in frame and frame[c].nunique(dropna=False) > 1]


def _name(r: pd.Series, fields: list[str]) -> str:
    """``all_to_all · 4 ranks · skewed · zipf 1.2``: the values of ``fields`` in one row, in words."""
    parts = []
    for c in fields:
        v = r[c]
        if c == "ep_size":
            parts.append(f"{int(v)} ranks")
        elif c == "zipf_exponent":
            parts.append("" if pd.isna(v) else f"zipf {v:g}")
        elif c in ("hidden_size", "top_k", "num_experts"):
            parts.append(f"{c}={int(v)}")
        else:
            parts.append(str(v))
    return " · ".join(p for p in parts if p)


def _curve_label(frame: pd.DataFrame) -> pd.Series:
    """One name per curve, from the fields that differ between the frame's curves (the backend when none do)."""
    varying = _varying(frame, CURVE) or ["all2all_backend"]
    return frame.apply(lambda r: _name(r, varying), axis=1) if len(frame) else pd.Series([], dtype=str)


def load(source: str | Path | Iterable[str | Path], *, failed: bool = True) -> pd.DataFrame:
    """Every microbenchmark point under ``source`` as one tidy frame (one row per point), sorted by curve and
    tokens, with ``config`` naming the curve by what sets it apart. Raises FileNotFoundError when there is none."""
    frame = R.load(source, failed=failed)
    mine, _ = split(frame)
    if not len(mine):
        raise FileNotFoundError(f"no epkit a2a-bench results under {source!r}")
    mine = mine.copy()
    mine["config"] = _curve_label(mine)
    if "hardware" in mine:  # stored as JSON text in the frame; the device's name is worth a column
        mine["device_name"] = [json.loads(h).get("device_name") if isinstance(h, str) else None
                               for h in mine["hardware"]]
    for col in ("tokens_per_rank", "ep_size", *[m for m in METRICS if m != "identity_ok"]):
        if col in mine:
            mine[col] = pd.to_numeric(mine[col], errors="coerce")
    return mine.sort_values(["config", "tokens_per_rank"]).reset_index(drop=True)


def _shared(frame: pd.DataFrame) -> str:
    same = [f"{c}={frame[c].iloc[0]}" for c in CURVE if c in frame and frame[c].nunique(dropna=False) == 1
            and pd.notna(frame[c].iloc[0])]
    return ", ".join(same)


def latency_vs_tokens(frame: pd.DataFrame, y: str = "median_latency_us", p99: bool = True,
                      heading: str = "Dispatch + combine latency vs tokens per rank") -> go.Figure:
    """Latency (µs) against tokens per rank, log-log: one colour per curve (backend, …), the median solid and
    (``p99``) the p99 dotted. Hover names the point's curve, numbers and source file."""
    ok = frame[frame["status"] == "ok"] if "status" in frame else frame
    fig = go.Figure()
    palette = qualitative.Plotly + qualitative.D3
    for i, (label, g) in enumerate(ok.groupby("config", sort=True)):
        g = g.sort_values("tokens_per_rank")
        color = palette[i % len(palette)]
        hover = [f"{label}<br>{int(r.tokens_per_rank)} tokens/rank<br>median {r.median_latency_us:.1f} µs, "
                 f"p99 {r.p99_latency_us:.1f} µs<br>bus {r.busbw_gbs:.3g} GB/s, alg {r.algbw_gbs:.3g} GB/s<br>"
                 f"{r.source}" for r in g.itertuples()]
        fig.add_trace(go.Scatter(x=g["tokens_per_rank"], y=g[y], mode="lines+markers", name=label,
                                 line=dict(color=color), hovertext=hover, hoverinfo="text"))
        if p99 and y != "p99_latency_us" and "p99_latency_us" in g:
            fig.add_trace(go.Scatter(x=g["tokens_per_rank"], y=g["p99_latency_us"], mode="lines", name=f"{label} (p99)",
                                     line=dict(color=color, dash="dot"), hovertext=hover, hoverinfo="text",
                                     showlegend=False))
    shared = _shared(ok)
    fig.update_layout(title=dict(text=heading, subtitle=dict(text=f"all: {shared}" if shared else "")),
                      template="plotly_white", hovermode="closest", legend=dict(orientation="h", y=-0.2),
                      margin=dict(l=70, r=20, t=70, b=60))
    ticks = sorted({int(t) for t in ok["tokens_per_rank"].dropna()})  # the ladder itself, not 2 3 4 … 9
    fig.update_xaxes(type="log", title=TITLES["tokens_per_rank"], tickvals=ticks, ticktext=[str(t) for t in ticks])
    fig.update_yaxes(type="log", title=TITLES.get(y, y) + (" · dotted: p99" if p99 else ""))
    return fig


def bandwidth_vs_tokens(frame: pd.DataFrame, y: str = "busbw_gbs") -> go.Figure:
    """Bus (or algorithm, ``y="algbw_gbs"``) bandwidth against tokens per rank, log x, one curve per backend."""
    fig = latency_vs_tokens(frame, y=y, p99=False, heading=f"{TITLES[y]} vs tokens per rank")
    fig.update_yaxes(type="linear", title=TITLES[y])
    return fig


def figures(frame: pd.DataFrame) -> dict[str, go.Figure]:
    """The microbenchmark's figures by heading, for the rows of any results frame (none when it has no such rows):
    latency against tokens, one figure per setting (ranks, routing, … where they vary) with a curve per backend;
    bus bandwidth (and the fraction of the link, where known) with every curve."""
    mine, _ = split(frame)
    ok = mine[mine["status"] == "ok"] if "status" in mine else mine
    if not len(ok):
        return {}
    ok = ok.assign(config=_curve_label(ok))  # curve names (a sweep frame's config says other things)
    settings = _varying(ok, [c for c in CURVE if c != "all2all_backend"])
    out = {}
    for key, g in (ok.groupby(settings, dropna=False, sort=True) if settings else [((), ok)]):
        name = _name(g.iloc[0], settings) if settings else ""
        heading = "all2all latency vs tokens" + (f" · {name}" if name else "")
        out[heading] = latency_vs_tokens(g.assign(config=g["all2all_backend"]), heading=heading)
    out["all2all bus bandwidth vs tokens"] = bandwidth_vs_tokens(ok)
    if "link_fraction" in ok and ok["link_fraction"].notna().any():
        out["all2all fraction of the link"] = bandwidth_vs_tokens(ok, y="link_fraction")
    return out


def _table(frame: pd.DataFrame) -> str:
    cols = [c for c in TABLE_COLUMNS if c in frame and frame[c].notna().any()]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for _, r in frame.iterrows():
        cells = "".join(f"<td>{html.escape('' if pd.isna(r[c]) else (f'{r[c]:.4g}' if isinstance(r[c], float) else str(r[c])))}</td>"
                        for c in cols)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render(source: str | Path | Iterable[str | Path], title: str | None = None, plotly_src: str | None = None) -> str:
    """One self-contained HTML page (plotly.js inlined once: it opens offline) with the microbenchmark's
    figures and its table, for every point under ``source``; ``plotly_src``: load plotly.js from that path instead."""
    from plotly.offline import get_plotlyjs

    frame = load(source)
    title = title or "epkit a2a-bench: MoE dispatch + combine per backend"
    parts = []
    for heading, fig in figures(frame).items():
        parts.append(f"<h2>{html.escape(heading)}</h2>" + fig.to_html(full_html=False, include_plotlyjs=False,
                                                                      config={"displaylogo": False}))
    meta = (f"{len(frame)} point(s) from {html.escape(str(source))} · written "
            f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} · definitions: docs/a2a_bench.md")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            + (f"<script type='text/javascript' src='{html.escape(plotly_src)}'></script>" if plotly_src else
               f"<script type='text/javascript'>{get_plotlyjs()}</script>")
            + f"<style>body{{font-family:system-ui,sans-serif;"
            f"margin:24px auto;max-width:1280px}} table{{border-collapse:collapse;font-size:12px}} th,td{{border:1px "
            f"solid #ddd;padding:3px 6px;text-align:right}}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{meta}</p>{''.join(parts)}<h2>Points</h2>{_table(frame)}</body></html>")


def write(source: str | Path | Iterable[str | Path], out: str | Path, title: str | None = None,
          plotly_js: str | Path | None = None) -> Path:
    """Write :func:`render`'s page to ``out`` (folders made as needed); returns the path. ``plotly_js``: as in
    :func:`epkit.analysis.report.write` (one shared plotly.js file, loaded by a relative path)."""
    from epkit.analysis.assets import shared_plotly_js

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    src = shared_plotly_js(plotly_js, path) if plotly_js is not None else None
    path.write_text(render(source, title, src))
    return path
