"""Names of configurations: the full name of a topology and of a load, and the short legend
labels that name only what tells groups apart (``DP2 EP2 · naive``), for the frames
:mod:`epkit.analysis.results` builds."""

from __future__ import annotations

import json
import math

import pandas as pd


def describe_topology(r: pd.Series) -> str:
    def has(key):
        return key in r and r[key] is not None and not (isinstance(r[key], float) and math.isnan(r[key]))

    parts = [str(r["model"]).split("/")[-1] if has("model") else "?"]
    if has("engine"):
        parts.append(str(r["engine"]) + (f" {r['engine_version']}" if has("engine_version") else ""))
    if has("tp") or has("dp"):
        par = f"TP{int(r['tp']) if has('tp') else 1} DP{int(r['dp']) if has('dp') else 1}"
        if has("ep_size"):
            par += f" EP{int(r['ep_size'])}"
        elif bool(r.get("enable_expert_parallel", False)):
            par += " EP"
        parts.append(par)
    if has("nodes") and int(r["nodes"]) > 1:
        parts.append(f"{int(r['nodes'])} nodes")
    if has("pd") and r["pd"] != "colocated":  # disaggregated prefill/decode (1P1D…); colocated says nothing new
        parts.append(str(r["pd"]))
    if has("all2all_backend"):
        parts.append(str(r["all2all_backend"]))
    if has("eplb") and r["eplb"]:
        keys = {k[5:]: r[k] for k in r.index if k.startswith("eplb_") and has(k)}
        parts.append("EPLB(" + ", ".join(f"{k}={v}" for k, v in sorted(keys.items())) + ")")
    elif has("eplb"):
        parts.append("no EPLB")
    if len(parts) == 1 and has("label"):
        parts.append(str(r["label"]))
    return " · ".join(parts)


def describe_load(r: pd.Series) -> str:
    out = []
    rate = r.get("request_rate")
    if rate is not None and not (isinstance(rate, float) and math.isnan(rate)):
        out.append("rate=inf" if math.isinf(float(rate)) else f"rate={float(rate):g} req/s")
    conc = r.get("max_concurrency")
    if conc is not None and not (isinstance(conc, float) and math.isnan(conc)):
        out.append(f"concurrency={int(conc)}")
    rep = r.get("repeat")
    if rep is not None and not (isinstance(rep, float) and math.isnan(rep)) and int(rep) > 0:
        out.append(f"repeat {int(rep)}")
    return ", ".join(out)


# The parts of a configuration's name, in the order a label lists them (see short_labels).
LABEL_PARTS = ("model", "engine", "tp", "dp", "ep", "nodes", "pd", "backend", "eplb", "label", "rate", "concurrency",
               "repeat")
# The columns those parts read (requests() carries them into the request frame).
LABEL_COLUMNS = ["model", "engine", "engine_version", "tp", "dp", "ep_size", "enable_expert_parallel", "nodes", "pd",
                 "all2all_backend", "eplb", "label", "request_rate", "max_concurrency", "repeat"]


def _value(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _label_parts(r: pd.Series) -> dict[str, str | None]:
    """One row's name split into :data:`LABEL_PARTS` (None: the row does not say), plus
    ``eplb.<key>`` parts for the EPLB keys of a row with EPLB on."""
    def has(key):
        return key in r and r[key] is not None and not (isinstance(r[key], float) and math.isnan(r[key]))

    ep = None
    if has("ep_size"):
        ep = f"EP{int(r['ep_size'])}"
    elif has("enable_expert_parallel"):
        ep = "EP" if bool(r["enable_expert_parallel"]) else "no EP"
    rep = int(r["repeat"]) if has("repeat") else 0
    parts: dict[str, str | None] = {
        "model": str(r["model"]).split("/")[-1] if has("model") else None,
        "engine": (str(r["engine"]) + (f" {r['engine_version']}" if has("engine_version") else "")) if has("engine") else None,
        "tp": f"TP{int(r['tp'])}" if has("tp") else None,
        "dp": f"DP{int(r['dp'])}" if has("dp") else None,
        "ep": ep,
        "nodes": (f"{int(r['nodes'])} node" + ("s" if int(r["nodes"]) > 1 else "")) if has("nodes") else None,
        "pd": str(r["pd"]) if has("pd") else None,
        "backend": str(r["all2all_backend"]) if has("all2all_backend") else (
            "default backend" if has("engine") and bool(r.get("enable_expert_parallel")) and ep != "EP1" else None),
        "eplb": ("EPLB" if r["eplb"] else "no EPLB") if has("eplb") else None,
        "label": str(r["label"]) if has("label") else None,
        "rate": describe_load(r[["request_rate"]]) or None if "request_rate" in r else None,
        "concurrency": describe_load(r[["max_concurrency"]]) or None if "max_concurrency" in r else None,
        "repeat": f"repeat {rep}",
    }
    if has("eplb") and r["eplb"]:
        for key in sorted(k for k in r.index if k.startswith("eplb_") and has(k)):
            parts[f"eplb.{key[5:]}"] = f"{key[5:]}={_value(r[key])}"
    return parts


def _groups_parts(df: pd.DataFrame, by: str) -> tuple[dict, list[str], list[str]]:
    """Per value of ``by``: its parts; the part names that tell the groups apart; those all share."""
    cols = [c for c in df.columns if c in LABEL_COLUMNS or c.startswith("eplb_")]
    rows = df[[by] + [c for c in cols if c != by]].astype(object)
    rows = rows.map(lambda v: json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v).drop_duplicates()
    per_group: dict = {}
    constant: set[str] | None = None
    for key, g in rows.groupby(by, sort=False, dropna=False):
        parts = [_label_parts(r) for _, r in g.iterrows()]
        first = parts[0]
        names = set().union(*parts)
        same = {n for n in names if all(p.get(n) == first.get(n) for p in parts)}  # describes the whole group
        constant = same if constant is None else constant & same
        per_group[key] = first
    constant = constant or set()
    names = []
    for n in LABEL_PARTS:  # EPLB keys right after "EPLB"
        names += [n] + (sorted(k for k in constant if k.startswith("eplb.")) if n == "eplb" else [])
    names = [n for n in names if n in constant]
    varying, shared = [], []
    for n in names:  # a part tells groups apart when it takes two values where given (None: not recorded)
        groups = [p for p in per_group.values() if not n.startswith("eplb.") or p.get("eplb") == "EPLB"]
        values = {p.get(n) for p in groups} - {None}
        if len(values) > 1:
            varying.append(n)
        elif values and all(p.get(n) is not None for p in per_group.values()):
            shared.append(n)
    return per_group, varying, shared


def short_labels(df: pd.DataFrame, by: str = "topology") -> dict:
    """A short name for every value of column ``by`` (``topology``, ``config``, ``load``, a
    backend…): only the parts of the configuration that differ between the groups, e.g.
    ``DP2 EP2 · naive · no EPLB`` where every row shares model, engine and TP. Parts that vary
    inside a group (the load within a topology) are left out. Falls back to the value itself
    where the parts cannot tell two groups apart. The full names stay in ``config``/``topology``
    for hover text; :func:`shared_label` names what the groups have in common."""
    if by not in df:
        raise KeyError(f"short_labels: column {by!r} not in the frame; columns: {', '.join(df.columns)}")
    per_group, varying, _ = _groups_parts(df, by)
    names = [n for n in varying if n != "label"]
    labels = {}
    for key, parts in per_group.items():
        if 2 * sum(parts.get(n) is None for n in names) > len(names):  # a result that records too little
            labels[key] = str(key)  # (a plain `vllm bench serve` file among sweeps): its own name
        else:
            labels[key] = _join(parts, names) or (parts.get("label") if "label" in varying else None) or str(key)
    seen: dict[str, int] = {}
    for text in labels.values():
        seen[text] = seen.get(text, 0) + 1
    return {key: text if seen[text] == 1 else str(key) for key, text in labels.items()}


def _join(parts: dict, names: list[str]) -> str:
    """``TP1 DP2 EP2 · naive · no EPLB``: the parallel sizes side by side, other parts with dots."""
    out: list[str] = []
    previous = None
    for n in names:
        text = parts.get(n)
        if not text or text == "repeat 0":
            continue
        if n in ("tp", "dp", "ep") and previous in ("tp", "dp", "ep"):
            out[-1] += " " + text
        else:
            out.append(text)
        previous = n
    return " · ".join(out)


def shared_label(df: pd.DataFrame, by: str = "topology") -> str:
    """What every group of :func:`short_labels` has in common, as one name (e.g.
    ``epkit-tiny-moe · epkit 0.1.0 · TP1``); empty when nothing is shared."""
    if by not in df or not len(df):
        return ""
    per_group, _, shared = _groups_parts(df, by)
    return _join(next(iter(per_group.values())), [n for n in shared if n not in ("repeat", "label")])
