"""The ``pd`` axis of a sweep: a topology point served colocated or split into prefill and decode instances.

```yaml
topologies:
  dp: 4
  grid: {pd: [colocated, 1P1D, 1P3D, 3P1D]}        # colocated, or <p>P<d>D
  prefill: {all2all_backend: deepep_high_throughput}  # optional: topology fields of the prefill side
  decode: {all2all_backend: deepep_low_latency}       # optional: of the decode side
  kv_transfer_config: {kv_connector: NixlConnector, kv_role: kv_both}   # the default
  router: {policy: round_robin, on: decode0}          # optional (epkit proxy)
  share_gpus: false                                   # true: every instance on the point's GPUs (below)
```

``<p>P<d>D`` splits the point's GPUs (tp × dp) evenly over p prefill + d decode instances: each runs
the point's topology with ``dp / (p + d)`` (exact, else a :class:`~epkit.errors.TopologyError` naming pd
and dp), the same model, backend and EPLB unless ``prefill:`` / ``decode:`` say otherwise. A colocated
point runs without a KV connector: it is the reference the split points are compared with, on the same
GPU count. With ``share_gpus: true`` every instance instead runs the point's whole topology on the same GPUs,
each with ``gpu_memory_utilization`` divided by p + d (one GPU serving a prefill and a decode instance of a
model small enough for both; size the KV cache with ``--kv-cache-memory-bytes`` where the engine counts the
other instance's memory as used). Everything here is pure.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from epkit.errors import TopologyError
from epkit.topology import Topology

# Point keys that describe the split; they are not topology fields.
PD_KEYS = ("pd", "prefill", "decode", "kv_transfer_config", "router", "share_gpus")
COLOCATED = "colocated"
_SPLIT = re.compile(r"([1-9][0-9]*)P([1-9][0-9]*)D", re.IGNORECASE)


def parse_pd(value: Any, where: str = "topology") -> tuple[int, int] | None:
    """``(p, d)`` of ``<p>P<d>D``, None for ``colocated``; anything else is a TopologyError."""
    if value == COLOCATED:
        return None
    match = _SPLIT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise TopologyError(f"{where}: pd={value!r}; allowed: colocated or <p>P<d>D with p, d >= 1 (1P1D, 1P2D, 2P1D…)")
    return int(match.group(1)), int(match.group(2))


def pd_name(value: Any) -> str:
    """The canonical spelling (``1P2D``, ``colocated``)."""
    split = parse_pd(value)
    return COLOCATED if split is None else f"{split[0]}P{split[1]}D"


def pop_pd(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(topology fields, the point's split options): ``pd`` and, when it is given, the keys of :data:`PD_KEYS`.
    Without ``pd`` every key stays a topology field."""
    fields = dict(fields)
    if "pd" not in fields:
        stray = [k for k in ("prefill", "decode", "router") if k in fields]
        if stray:
            raise TopologyError(f"{', '.join(stray)} describe(s) a split point: give pd too (pd: 1P1D, or an axis "
                                "pd: [colocated, 1P1D]); allowed without pd: topology fields only")
        return fields, {}
    return fields, {k: fields.pop(k) for k in PD_KEYS if k in fields}


def _instance_fields(base: Topology, pd: str, parts: int) -> dict[str, Any]:
    """The base topology's fields for one of ``parts`` equal instances."""
    if base.dp % parts:
        ok = [n for n in range(2, base.dp + 1) if base.dp % n == 0]
        raise TopologyError(
            f"pd={pd} splits dp={base.dp} over {parts} instances: dp must be a multiple of p + d = {parts} (every "
            f"instance gets dp / (p + d) of the point's {base.tp * base.dp} GPUs); allowed at dp={base.dp}: colocated"
            + (f" or a split into {', '.join(map(str, ok))} instances" if ok else ""))
    dp = base.dp // parts
    fields = base.to_dict()
    fields.update(dp=dp, dp_local=None, data_parallel_rpc_port=None, master_port=None)
    if base.nodes > 1:
        if base.nodes % parts == 0:
            fields["nodes"] = base.nodes // parts
        elif base.tp * dp <= base.gpus_per_node:
            fields.update(nodes=1, data_parallel_address=None)
        else:
            raise TopologyError(
                f"pd={pd}: nodes={base.nodes} do not split over {parts} instances and one instance (tp={base.tp} × "
                f"dp={dp}) does not fit on one node of gpus_per_node={base.gpus_per_node}; allowed: nodes a "
                f"multiple of {parts}, or a split whose instances fit one node")
    if fields.get("nodes", 1) == 1:  # the point's address is one node's; each single-node instance finds its own
        fields["data_parallel_address"] = None
    return fields


def _side(options: Mapping[str, Any], side: str) -> dict[str, Any]:
    over = options.get(side) or {}
    if not isinstance(over, Mapping):
        raise TopologyError(f"{side}={over!r} must be a mapping of topology fields for the {side} instances")
    bad = sorted(set(over) - set(Topology.field_names()))
    if bad:
        raise TopologyError(f"{side} has unknown key(s) {', '.join(map(str, bad))}; valid keys: "
                            f"{', '.join(Topology.field_names())}")
    return dict(over)


def split(base: Topology, options: Mapping[str, Any]):
    """The :class:`~epkit.topology.DisaggTopology` of a ``<p>P<d>D`` point (None for ``colocated``)."""
    from epkit.topology.disagg import DisaggTopology

    pd = options.get("pd", COLOCATED)
    parts = parse_pd(pd)
    if parts is None:
        return None
    p, d = parts
    share = options.get("share_gpus", False)
    if not isinstance(share, bool):
        raise TopologyError(f"share_gpus={share!r}; allowed: true (every instance on the point's GPUs) or false")
    if share:
        fields = base.to_dict()
        fields.update(data_parallel_rpc_port=None, master_port=None,
                      gpu_memory_utilization=round((base.gpu_memory_utilization or 0.92) / (p + d), 4))
    else:
        fields = _instance_fields(base, pd_name(pd), p + d)
    # no kv_transfer_config: the seed's NixlConnector with kv_both, and no kv_buffer_device (vLLM 0.32.0 takes the
    # platform's device: cuda on GPUs, cpu on vLLM-CPU; the built-in engine keeps its blocks where it runs)
    return DisaggTopology.from_dict({
        "prefill": [{**fields, **_side(options, "prefill"), "count": p}],
        "decode": [{**fields, **_side(options, "decode"), "count": d}],
        "kv_transfer_config": options.get("kv_transfer_config"), "router": options.get("router")})


def columns(pd: str | None, disagg: Any, share_gpus: bool = False) -> dict[str, Any]:
    """The result columns of a point: ``pd``, ``pd_prefill_instances``, ``pd_decode_instances`` and, when split,
    the GPUs of each side (``prefill_gpus``, ``decode_gpus``; with ``share_gpus`` every side has the point's)."""
    if disagg is None:
        return {"pd": pd_name(pd or COLOCATED), "pd_prefill_instances": None, "pd_decode_instances": None}
    roles = [(role, topo) for role, _, topo in disagg.instances]
    gpus = {side: sum(t.world_size for role, t in roles if role == side) for side in ("prefill", "decode")}
    if share_gpus:
        gpus = dict.fromkeys(gpus, roles[0][1].world_size)
    return {"pd": pd_name(pd), "pd_prefill_instances": sum(r == "prefill" for r, _ in roles),
            "pd_decode_instances": sum(r == "decode" for r, _ in roles), "pd_share_gpus": share_gpus,
            "prefill_gpus": gpus["prefill"], "decode_gpus": gpus["decode"],
            "world_size": gpus["prefill"] if share_gpus else disagg.gpus}


def runs_as(disagg: Any, instance_key) -> str:
    """What a split point runs: each instance as ``instance_key`` sees it, the connector and the router."""
    return json.dumps({"instances": [[role, instance_key(topo)] for role, _, topo in disagg.instances],
                       "kv": disagg.kv_transfer_config.explicit(), "router": disagg.router.to_dict()}, default=str)
