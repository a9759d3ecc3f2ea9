"""``GET /eplb/loads``: every rank's recorded expert loads stitched into one EPLB trace (JSON or NPZ).

The trace format is docs/eplb.md's ``epkit-eplb-trace``; ``epkit.eplb.read_trace`` reads both forms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from epkit.engine.protocol import ApiError

if TYPE_CHECKING:
    from epkit.engine.openai_api import Api

NOT_ENABLED = "EPLB is not enabled on this deployment (start it with --enable-eplb)"


def stitch_trace(dumps: list[dict | None], model: str, last: int | None = None) -> dict[str, Any]:
    """Every rank's slot loads as one ``epkit-eplb-trace`` JSON document (``kind: physical``).

    Rank ``r`` holds physical slots ``r*S .. r*S+S-1``; steps are the engine steps every rank
    recorded (lockstep), the last ``last`` of them if given. ``epkit.eplb.read_trace`` reads it.
    """
    import numpy as np

    from epkit.eplb.readers import TRACE_FORMAT, TRACE_VERSION

    if not dumps or any(d is None for d in dumps):
        raise ApiError(404, NOT_ENABLED)
    common = set(dumps[0]["steps"]).intersection(*(d["steps"] for d in dumps[1:]))
    steps = sorted(common)[-last:] if last else sorted(common)
    load = np.concatenate([d["load"][[d["steps"].index(s) for s in steps]] for d in dumps], axis=-1)
    maps = dumps[0]["maps"]

    def map_at(step: int):
        current = maps[0][1]
        for first, m in maps:
            if first <= step:
                current = m
        return current

    doc: dict[str, Any] = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "kind": "physical", "model": model,
                           "num_logical_experts": dumps[0]["num_logical_experts"], "num_ranks": len(dumps),
                           "eplb_config": dumps[0]["config"], "steps": []}
    current = None
    for i, step in enumerate(steps):
        entry: dict[str, Any] = {"step": step, "load": load[i].astype(np.int64).tolist()}
        m = map_at(step)
        if current is None:
            doc["physical_to_logical"] = m
        elif m != current:
            entry["physical_to_logical"] = m
        current = m
        doc["steps"].append(entry)
    if current is None:
        doc["physical_to_logical"] = maps[-1][1]
    return doc


def trace_npz(doc: dict[str, Any]) -> bytes:
    """The same trace in epkit's NPZ layout (``load[T, L, P]``, ``physical_to_logical[T, L, P]``, ``step``)."""
    import io

    import numpy as np

    maps, current = [], doc["physical_to_logical"]
    for entry in doc["steps"]:
        current = entry.get("physical_to_logical", current)
        maps.append(current)
    num_layers = len(doc["physical_to_logical"])
    num_slots = len(doc["physical_to_logical"][0]) if num_layers else 0
    buf = io.BytesIO()
    np.savez_compressed(buf, load=np.array([e["load"] for e in doc["steps"]], dtype=np.int64).reshape(-1, num_layers, num_slots),
                        physical_to_logical=np.array(maps, dtype=np.int64).reshape(-1, num_layers, num_slots),
                        step=np.array([e["step"] for e in doc["steps"]], dtype=np.int64), kind=np.array("physical"),
                        num_logical_experts=np.array(int(doc["num_logical_experts"])), version=np.array(doc["version"]))
    return buf.getvalue()


def add_eplb_routes(app: FastAPI, api: "Api") -> None:
    """``GET /eplb/loads?steps=N&format=json|npz``."""

    @app.get("/eplb/loads")
    async def eplb_loads(request: Request):
        """Per-step, per-physical-expert token counts of the last recorded steps (docs/eplb.md trace format)."""
        last = request.query_params.get("steps")
        fmt = request.query_params.get("format", "json")
        if last is not None and (not last.isdigit() or int(last) < 1):
            raise ApiError(400, f"steps={last!r} must be a positive integer", "steps")
        if fmt not in ("json", "npz"):
            raise ApiError(400, f"format={fmt!r}; allowed: json, npz", "format")
        if not api.cfg.enable_eplb:
            raise ApiError(404, NOT_ENABLED)
        doc = stitch_trace(await api.engine.eplb_dumps(), api.cfg.model_name, int(last) if last else None)
        if fmt == "npz":
            return Response(trace_npz(doc), media_type="application/octet-stream",
                            headers={"content-disposition": "attachment; filename=eplb_trace.npz"})
        return JSONResponse(doc)
