"""The bundled reference cases: inputs and the reference default policy's outputs.

``epkit/data/eplb_reference_cases.json`` (a copy of the project's shared cases) holds,
per case, ``weight[L, E]``, ``num_replicas``, ``num_groups``, ``num_nodes``,
``num_gpus`` and the reference's ``max_gpu_load_per_layer`` and ``balancedness``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from epkit.eplb.placement import Placement, balancedness

REFERENCE_FILE = "eplb_reference_cases.json"


def load_reference_cases(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The cases of the bundled file (or of ``path``), each with ``weight`` as a float array."""
    if path is None:
        text = resources.files("epkit").joinpath("data", REFERENCE_FILE).read_text()
    else:
        text = Path(path).read_text()
    cases = json.loads(text)["cases"]
    for case in cases:
        case["weight"] = np.asarray(case["weight"], dtype=np.float64)
    return cases


def score(case: dict[str, Any], placement: Placement) -> dict[str, Any]:
    """Max GPU load per layer and balancedness of ``placement`` on a case's weights."""
    loads = placement.rank_loads(case["weight"], case["num_gpus"])
    return {"max_gpu_load_per_layer": loads.max(1), "balancedness": balancedness(loads)}
