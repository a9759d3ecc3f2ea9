"""Plotly figures for notebooks and ``epkit report``: every axis titled with its unit, every
point's hover text naming the full configuration and the file its numbers came from.

Legends name each group by what sets it apart from the others (:func:`epkit.analysis.results.short_labels`:
``DP2 EP2 · naive``), sit below the plot so the plot keeps the figure's width, and the parts every
group shares (model, engine, …) go into the subtitle.

Figures take the frames :mod:`epkit.analysis.results` and :func:`epkit.eplb.simulate` build; they
draw, they do not compute metrics (aggregation over repeats is :func:`epkit.analysis.results.aggregate`,
the frontier :func:`epkit.analysis.results.pareto_frontier`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from epkit.analysis import results as R
from epkit.analysis import sla as SLA

# Axis titles for the columns figures use most; others get a title from their unit suffix.
TITLES = {
    "output_throughput": "Output throughput (tok/s)",
    "total_token_throughput": "Total throughput (tok/s)",
    "input_throughput": "Input throughput (tok/s)",
    "request_throughput": "Request throughput (req/s)",
    "total_tok_s_per_gpu": "Total throughput per GPU (tok/s/GPU)",
    "output_tok_s_per_gpu": "Output throughput per GPU (tok/s/GPU)",
    "input_tok_s_per_gpu": "Input throughput per GPU (tok/s/GPU)",
    "input_tok_s_per_prefill_gpu": "Input throughput per prefill GPU (tok/s/GPU)",
    "output_tok_s_per_decode_gpu": "Output throughput per decode GPU (tok/s/GPU)",
    "interactivity_pareto_tok_s": "Interactivity: output throughput ÷ concurrency (tok/s/user)",
    "interactivity_inferencex_tok_s": "Interactivity: 1000 ÷ median TPOT (tok/s/user)",
    "interactivity_mean_tpot_tok_s": "Interactivity: 1000 ÷ mean TPOT (tok/s/user)",
    "request_rate": "Request rate (req/s)",
    "max_concurrency": "Max concurrency (requests)",
    "max_concurrent_requests": "Peak concurrent requests (requests)",
    "max_output_tokens_per_s": "Peak output throughput (tok/s)",
    "balancedness": "Balancedness (mean ÷ max rank load, 1 = even)",
    "mean_rank_load": "Mean rank load (tokens, Σ layers)",
    "max_rank_load": "Max rank load (tokens, Σ layers)",
    "step": "Engine step",
    "bytes_moved": "Bytes moved (B)",
    "experts_moved": "Experts moved (replicas)",
    "duration": "Duration (s)",
    "gpus": "GPUs",
}
_LAT = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency", "tpot_incl_first": "TPOT incl. first token",
        "prefill": "prefill (router)", "kv_transfer": "KV transfer (router)"}
_CONFIG = {"displaylogo": False, "responsive": True}


def title(column: str) -> str:
    """The axis title of ``column``, with its unit."""
    if column in TITLES:
        return TITLES[column]
    for stat in ("mean", "median", "std", "p"):
        for key, name in _LAT.items():
            if column.endswith(f"_{key}_ms") and column.startswith(stat):
                return f"{column[: -len(key) - 4].replace('_', ' ').capitalize()} {name} (ms)".replace("  ", " ")
    for key, name in _LAT.items():
        if column == f"{key}_ms":
            return f"{name} (ms)"
    for suffix, unit in (("_ms", "ms"), ("_tok_s", "tok/s"), ("_bytes", "B"), ("_s", "s")):
        if column.endswith(suffix):
            return f"{column[: -len(suffix)].replace('_', ' ')} ({unit})"
    return column.replace("_", " ")


def _layout(fig: go.Figure, heading: str, x: str, y: str, legend: str | None = None, shared: str = "") -> go.Figure:
    """Titles, and the legend in rows below the plot (a legend beside it takes the plot's width).

    Entries get one width, a fraction of the plot's: as many columns as names of the longest
    length fit in about 1100 px (7 px a character plus the symbol). With widths measured per entry,
    plotly's wrapping let a row run past the figure's right edge."""
    names = [t.name or "" for t in fig.data if t.showlegend is not False]
    entry_px = 7 * max(map(len, names), default=0) + 45
    columns = max(1, min(len(names), 1100 // entry_px))
    fig.update_layout(title=dict(text=heading, subtitle=dict(text=f"all: {shared}" if shared else "")),
                      xaxis_title=x, yaxis_title=y, template="plotly_white", hovermode="closest",
                      legend=dict(title_text=f"{legend}: " if legend else None, title_side="top left", orientation="h", xref="container", xanchor="left", x=0.01,
                                  yref="container", yanchor="bottom", y=0, entrywidthmode="fraction", entrywidth=1 / columns - 0.001),
                      margin=dict(l=70, r=20, t=70 if shared else 60, b=60))
    return fig


def _labels(df: pd.DataFrame, by: str) -> dict[str, str]:
    """Short legend names of the groups of ``by`` (keys as strings, as the figures group them)."""
    if not len(df) or by not in df:
        return {}
    return {str(k): v for k, v in R.short_labels(df, by).items()}


def _shared(df: pd.DataFrame, by: str) -> str:
    return R.shared_label(df, by) if len(df) and by in df else ""


def _ordered(values) -> list[str]:
    """Group keys as strings in natural order (``rate=4`` before ``rate=16``, ``DP2`` before ``DP10``)."""
    def key(text: str):
        return [(0, float(t), "") if t.replace(".", "", 1).isdigit() else (1, 0.0, t)
                for t in re.split(r"(\d+(?:\.\d+)?)", text)]
    return sorted({str(v) for v in values}, key=key)


def _colors(keys: Sequence) -> dict:
    palette = qualitative.Plotly + qualitative.D3
    return {k: palette[i % len(palette)] for i, k in enumerate(keys)}


def _pick_color(df: pd.DataFrame, color: str | None) -> str:
    if color:
        if color not in df:
            raise KeyError(f"color column {color!r} not in the frame; columns: {', '.join(df.columns)}")
        return color
    for col in ("all2all_backend", "topology", "label"):
        if col in df and df[col].notna().any() and df[col].nunique() > 1:
            return col
    return "topology"


def _hover(df: pd.DataFrame, x: str, y: str) -> list[str]:
    cols = [c for c in ("config", "source") if c in df]
    out = []
    for _, r in df.iterrows():
        lines = [f"<b>{r['config']}</b>" if "config" in cols else ""]
        lines.append(f"{title(x)}: {r[x]:.4g}")
        lines.append(f"{title(y)}: {r[y]:.4g}")
        if "source" in cols:
            lines.append(f"<span style='font-size:10px'>{r['source']}</span>")
        out.append("<br>".join(line for line in lines if line))
    return out


def _resolve_y(data: pd.DataFrame, y: str) -> tuple[str, str]:
    """``y``, or its per-deployment column when no result knows its GPU count (plain
    ``epkit bench`` / ``vllm bench serve`` files carry no topology), with a note for the title."""
    total = y.replace("_tok_s_per_gpu", "_throughput")
    if y.endswith("_tok_s_per_gpu") and y in data and data[y].isna().all() and total in data:
        return total, " (GPU count unknown: per deployment)"
    return y, ""


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if "status" in df else df


def pareto(df: pd.DataFrame, x: str = "interactivity_pareto_tok_s", y: str = "output_tok_s_per_gpu",
           color: str | None = None, frontier: bool = True, heading: str | None = None) -> go.Figure:
    """Throughput per GPU against interactivity: every point as a marker, and per ``color``
    group (default: the all2all backend when it varies, else the topology) its Pareto frontier
    as a line. Higher and further right is better on both axes."""
    data = _ok(df)
    y, note = _resolve_y(data, y)
    data = data.dropna(subset=[x, y])
    color = _pick_color(data, color)
    keys = _ordered(data[color])
    colors = _colors(keys)
    names = _labels(data, color)
    fig = go.Figure()
    for key in keys:
        g = data[data[color].astype(str) == key]
        fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="markers", name=names.get(key, key), legendgroup=key,
                                 marker=dict(color=colors[key], size=9, opacity=0.55 if frontier else 0.9),
                                 hovertext=_hover(g, x, y), hoverinfo="text"))
        if frontier:
            f = R.pareto_frontier(g, x, y)
            fig.add_trace(go.Scatter(x=f[x], y=f[y], mode="lines+markers", name=f"{key} frontier",
                                     legendgroup=key, showlegend=False, line=dict(color=colors[key], width=2.5),
                                     marker=dict(color=colors[key], size=10),
                                     hovertext=_hover(f, x, y), hoverinfo="text"))
    return _layout(fig, heading or f"Pareto frontier by {color.replace('_', ' ')}{note}", title(x), title(y),
                   color.replace("_", " "), _shared(data, color))


def _load_axis(df: pd.DataFrame) -> str:
    conc = pd.to_numeric(df["max_concurrency"], errors="coerce").dropna() if "max_concurrency" in df else pd.Series(dtype=float)
    rate = pd.to_numeric(df["request_rate"], errors="coerce") if "request_rate" in df else pd.Series(dtype=float)
    if conc.nunique() > 1 or (len(conc) and not np.isfinite(rate).any()):
        return "max_concurrency"
    return "request_rate"


def metric_vs_load(df: pd.DataFrame, y: str = "output_tok_s_per_gpu", x: str | None = None,
                   color: str = "topology", heading: str | None = None) -> go.Figure:
    """``y`` against offered load (``max_concurrency`` when it varies, else ``request_rate``):
    one line per ``color`` group, the mean over repeats with min–max error bars."""
    data = _ok(df)
    y, note = _resolve_y(data, y)
    x = x or _load_axis(data)
    data = data[np.isfinite(pd.to_numeric(data[x], errors="coerce"))] if x in data else data.iloc[0:0]
    agg = R.aggregate(data, [y], by=[color, x])
    keys = _ordered(agg[color])
    colors = _colors(keys)
    names = _labels(data, color)
    fig = go.Figure()
    for key in keys:
        g = agg[agg[color].astype(str) == key].sort_values(x)
        hover = [f"<b>{key}</b><br>{title(x)}: {a:g}<br>{title(y)}: {b:.4g} (mean of {n}; min {lo:.4g}, max {hi:.4g})"
                 for a, b, n, lo, hi in zip(g[x], g[y], g["repeats"], g[f"{y}_min"], g[f"{y}_max"])]
        fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="lines+markers+text", text=[_short_load(r) for _, r in g.iterrows()],
                                 textposition="top right", textfont=dict(size=10, color=colors[key]), name=names.get(key, key),
                                 line=dict(color=colors[key]),
                                 error_y=dict(type="data", symmetric=False, array=g[f"{y}_max"] - g[y],
                                              arrayminus=g[y] - g[f"{y}_min"], visible=True),
                                 hovertext=hover, hoverinfo="text"))
    return _layout(fig, heading or f"{title(y)} vs {title(x)}{note}", title(x), title(y), color.replace("_", " "),
                   _shared(data, color))


def latency_cdf(requests: pd.DataFrame, metric: str = "ttft_ms", color: str = "config",
                max_points: int = 400, heading: str | None = None) -> go.Figure:
    """The empirical CDF of a per-request latency (``ttft_ms``, ``tpot_ms``, ``e2el_ms``, or
    ``itl_ms``, pooled over every token gap) from :func:`epkit.analysis.results.requests`, one line per
    ``color`` group. Long lines are thinned to ``max_points`` quantiles (the curve keeps its shape)."""
    data = R.itl_samples(requests) if metric == "itl_ms" else requests.dropna(subset=[metric])
    keys = _ordered(data[color]) if len(data) else []
    colors = _colors(keys)
    names = _labels(data, color)
    fig = go.Figure()
    for key in keys:
        values = np.sort(data.loc[data[color].astype(str) == key, metric].to_numpy(float))
        frac = np.arange(1, len(values) + 1) / len(values)
        if len(values) > max_points:
            idx = np.unique(np.linspace(0, len(values) - 1, max_points).round().astype(int))
            values, frac = values[idx], frac[idx]
        fig.add_trace(go.Scatter(x=values, y=frac, mode="lines", name=names.get(key, key),
                                 line=dict(color=colors[key], shape="hv"),
                                 hovertemplate=f"<b>{key}</b><br>{title(metric)}: %{{x:.4g}}<br>"
                                               "fraction ≤ x: %{y:.3f}<extra></extra>"))
    fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, heading or f"{title(metric).split(' (')[0]} CDF", title(metric),
                   "Fraction of requests" if metric != "itl_ms" else "Fraction of token gaps", color.replace("_", " "),
                   _shared(data, color))


def compare_bars(df: pd.DataFrame, y: str = "output_tok_s_per_gpu", x: str = "topology",
                 color: str | None = None, heading: str | None = None) -> go.Figure:
    """One bar per ``x`` (and ``color``) group: the mean of ``y`` over repeats (and over the
    rows a group holds), with min–max error bars and the count in the hover text."""
    data = _ok(df)
    y, note = _resolve_y(data, y)
    by = [x] + ([color] if color and color != x else [])
    agg = R.aggregate(data, [y], by=by)
    fig = go.Figure()
    groups = _ordered(agg[color]) if len(by) > 1 else [None]
    colors = _colors(groups)
    ticks = _labels(data, x)
    names = _labels(data, color) if len(by) > 1 else {}
    for key in groups:
        g = agg if key is None else agg[agg[color].astype(str) == key]
        hover = [f"<b>{a}</b>{'' if key is None else ' · ' + key}<br>{title(y)}: {b:.4g}<br>"
                 f"min {lo:.4g}, max {hi:.4g} over {n} result(s)"
                 for a, b, lo, hi, n in zip(g[x], g[y], g[f"{y}_min"], g[f"{y}_max"], g["repeats"])]
        fig.add_trace(go.Bar(x=[ticks.get(str(a), str(a)).replace(" · ", "<br>") for a in g[x]], y=g[y],
                             name=title(y) if key is None else names.get(key, key), marker_color=colors[key],
                             error_y=dict(type="data", symmetric=False, array=g[f"{y}_max"] - g[y],
                                          arrayminus=g[y] - g[f"{y}_min"], visible=True),
                             hovertext=hover, hoverinfo="text"))
    fig.update_layout(barmode="group", showlegend=len(groups) > 1)
    order = [ticks.get(k, k).replace(" · ", "<br>") for k in _ordered(agg[x])]
    fig.update_xaxes(tickangle=0, categoryorder="array", categoryarray=order)  # short labels, one part per line
    return _layout(fig, heading or f"{title(y)} by {x.replace('_', ' ')}{note}", x.replace("_", " "), title(y),
                   color.replace("_", " ") if color else None, _shared(data, x))


def pd_latency(df: pd.DataFrame, x: str = "p99_ttft_ms", y: str = "p99_itl_ms",
               slos_ms: Mapping[str, float] | None = None, heading: str | None = None) -> go.Figure:
    """What disaggregated prefill/decode trades: TTFT (``x``) against decode ITL (``y``), one marker
    per stored point (configuration and load), one line per topology through its loads, the marker
    shape per ``pd`` value. Colocated points are the reference: black, larger, first in the legend.
    Each marker is labelled with its load (``c=8``: concurrency, ``r=4``: req/s). A ``ttft`` limit in
    ``slos_ms`` is drawn as a dashed line when it lies near the points. Lower and further left is better."""
    data = _ok(df).dropna(subset=[x, y])
    data = data.assign(pd=data["pd"].fillna(SLA.COLOCATED).astype(str) if "pd" in data else SLA.COLOCATED)
    pds = sorted(set(data["pd"]), key=SLA.pd_order)
    symbols = dict(zip(pds, ["diamond", "circle", "square", "triangle-up", "cross", "x", "star", "hexagon"] * 4))
    first_pd = data.groupby("topology")["pd"].first()
    topologies = sorted(first_pd.index, key=lambda t: (SLA.pd_order(first_pd[t]), t))
    split = [t for t in topologies if (data.loc[data["topology"] == t, "pd"] != SLA.COLOCATED).any()]
    colors = {**_colors(split), **{t: "#111111" for t in topologies if t not in split}}
    names = _labels(data, "topology")
    fig = go.Figure()
    for key in topologies:
        g = data[data["topology"] == key]
        g = g.iloc[sorted(range(len(g)), key=lambda i: SLA.load_order(g.iloc[i]))]
        reference = key not in split
        hover = [f"{h}<br>pd: {p}<br>load: {ld}" for h, p, ld in zip(_hover(g, x, y), g["pd"], g["load"])]
        fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="lines+markers+text", text=[_short_load(r) for _, r in g.iterrows()],
                                 textposition="top right", textfont=dict(size=10, color=colors[key]),
                                 name=names.get(key, key) + (" (reference)" if reference else ""),
                                 line=dict(color=colors[key], width=2.5 if reference else 1.5,
                                           dash="dot" if reference else "solid"),
                                 marker=dict(color=colors[key], size=13 if reference else 10,
                                             symbol=[symbols[p] for p in g["pd"]], line=dict(color="white", width=1)),
                                 hovertext=hover, hoverinfo="text"))
    if slos_ms and "ttft" in slos_ms and x.endswith("_ttft_ms") and slos_ms["ttft"] <= 1.5 * data[x].max():
        fig.add_vline(x=slos_ms["ttft"], line=dict(color="#888", dash="dash"),
                      annotation_text=f"TTFT limit {slos_ms['ttft']:g} ms")
    return _layout(fig, heading or f"P/D: {title(x)} vs {title(y)} (one point per configuration and load)",
                   title(x), title(y), "topology", _shared(data, "topology"))


def _short_load(r: pd.Series) -> str:
    """``c=8`` (max concurrency) or ``r=4`` (request rate), the repeat after a slash when > 0."""
    conc, rate, rep = (pd.to_numeric(r.get(k), errors="coerce") for k in ("max_concurrency", "request_rate", "repeat"))
    text = f"c={conc:g}" if pd.notna(conc) else f"r={rate:g}" if pd.notna(rate) else ""
    return text + (f"/{int(rep)}" if pd.notna(rep) and rep > 0 else "")


def balancedness_timeline(sims: Mapping[str, pd.DataFrame] | pd.DataFrame, y: str = "balancedness",
                          heading: str | None = None) -> go.Figure:
    """Per-step ``balancedness`` (or another column) of one or several :func:`epkit.eplb.simulate`
    frames (a mapping name → frame), with the steps where EPLB rearranged marked."""
    runs = {"simulation": sims} if isinstance(sims, pd.DataFrame) else dict(sims)
    colors = _colors(list(runs))
    fig = go.Figure()
    for name, frame in runs.items():
        settings = ", ".join(f"{k}={v}" for k, v in (frame.attrs.get("eplb_config") or {}).items())
        label = f"{name} (policy {frame.attrs.get('policy', '?')}; {settings})"
        fig.add_trace(go.Scatter(x=frame["step"], y=frame[y], mode="lines", name=name, line=dict(color=colors[name], width=1.5),
                                 hovertemplate=f"<b>{label}</b><br>step %{{x}}<br>{title(y)}: %{{y:.4f}}<extra></extra>"))
        moves = frame[frame["rearranged"]] if "rearranged" in frame else frame.iloc[0:0]
        if len(moves):
            fig.add_trace(go.Scatter(x=moves["step"], y=moves[y], mode="markers", name=f"{name}: rearranged",
                                     marker=dict(color=colors[name], symbol="triangle-up", size=9),
                                     showlegend=False,
                                     customdata=moves[["experts_moved"]].to_numpy(),
                                     hovertemplate=f"<b>{label}</b><br>rearranged after step %{{x}}<br>"
                                                   "experts moved: %{customdata[0]}<extra></extra>"))
    return _layout(fig, heading or f"EPLB {title(y).split(' (')[0].lower()} over time", title("step"), title(y), "run")


def expert_load_heatmap(load, heading: str = "Expert load (layer × expert)", unit: str = "tokens") -> go.Figure:
    """A ``[layers, experts]`` load matrix (e.g. ``trace.load.sum(0)``) as a heatmap."""
    z = np.asarray(load, dtype=float)
    if z.ndim != 2:
        raise ValueError(f"expert_load_heatmap needs a [layers, experts] matrix; got shape {z.shape}")
    fig = go.Figure(go.Heatmap(z=z, colorscale="Viridis", colorbar=dict(title=unit),
                               hovertemplate="layer %{y}, expert %{x}<br>load: %{z:.4g} " + unit + "<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, heading, "Logical expert (id)", "MoE layer (index)")


def rank_load(loads: Mapping[str, np.ndarray], heading: str = "Load per EP/DP rank",
              unit: str = "tokens") -> go.Figure:
    """Per-rank load of one or several placements (name → ``[layers, ranks]`` or ``[ranks]``
    array, e.g. ``placement.rank_loads(load, num_ranks)``), summed over layers, as grouped bars
    with the mean rank load as a dashed line per placement."""
    colors = _colors(list(loads))
    fig = go.Figure()
    for name, arr in loads.items():
        arr = np.asarray(arr, dtype=float)
        per_rank = arr.sum(0) if arr.ndim == 2 else arr
        ranks = np.arange(len(per_rank))
        fig.add_trace(go.Bar(x=ranks, y=per_rank, name=name, marker_color=colors[name],
                             hovertemplate=f"<b>{name}</b><br>rank %{{x}}<br>load: %{{y:.4g}} {unit}<extra></extra>"))
        mean = float(per_rank.mean())
        fig.add_trace(go.Scatter(x=[ranks[0] - 0.5, ranks[-1] + 0.5], y=[mean, mean], mode="lines", showlegend=False,
                                 line=dict(color=colors[name], dash="dash"),
                                 hovertemplate=f"<b>{name}</b><br>mean rank load: {mean:.4g} {unit}<extra></extra>"))
    fig.update_layout(barmode="group")
    return _layout(fig, heading, "EP rank", f"Load ({unit}, Σ layers)", "placement")


def show_config() -> dict:
    """The plotly config epkit figures use (no logo link; responsive)."""
    return dict(_CONFIG)
