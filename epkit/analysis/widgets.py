"""An ipywidgets planner: pick model, GPUs, nodes, TP/DP, backend and EPLB; the per-node
commands and the memory plan (exactly what ``epkit plan`` prints) update on every change.

    from epkit.analysis.widgets import planner
    planner(model="deepseek-ai/DeepSeek-V3-0324", dp=8, enable_expert_parallel=True)
"""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from epkit.cli.plan import format_text, plan_report
from epkit.errors import EpkitError
from epkit.topology.models import bundled_model_names
from epkit.topology.plan import GPU_MEMORY_BYTES
from epkit.topology.spec import PlanSpec
from epkit.vllm import versions as vllm_versions


def plan_text(model: str, tp: int = 1, dp: int = 1, nodes: int = 1, gpus_per_node: int = 8,
              enable_expert_parallel: bool = False, all2all_backend: str | None = None,
              num_redundant_experts: int | None = None, engine: str = "vllm",
              vllm_version: str = vllm_versions.DEFAULT_VLLM_VERSION, gpus: tuple[str, ...] = ("H100", "H200")) -> str:
    """``epkit plan``'s text for these choices, or the error that names the bad field.
    ``num_redundant_experts=None`` leaves EPLB off."""
    topology: dict[str, Any] = dict(model=model, tp=tp, dp=dp, nodes=nodes, gpus_per_node=gpus_per_node,
                                    enable_expert_parallel=enable_expert_parallel, engine=engine,
                                    vllm_version=vllm_version)
    if all2all_backend:
        topology["all2all_backend"] = all2all_backend
    if num_redundant_experts is not None:
        topology["eplb"] = {"num_redundant_experts": num_redundant_experts}
    try:
        spec = PlanSpec.from_dict({**topology, "plan": {"gpus": list(gpus) or ["H100"]}}, source="widgets")
        return format_text(plan_report(spec))
    except EpkitError as exc:
        return f"not a valid deployment: {exc}"


def planner(model: str = "deepseek-ai/DeepSeek-V3-0324", tp: int = 1, dp: int = 8, nodes: int = 1,
            gpus_per_node: int = 8, enable_expert_parallel: bool = True, all2all_backend: str = "",
            eplb: bool = False, num_redundant_experts: int = 0, engine: str = "vllm",
            vllm_version: str = vllm_versions.DEFAULT_VLLM_VERSION,
            gpus: tuple[str, ...] = ("H100", "H200")) -> W.VBox:
    """The planner widget, starting from these values (see :func:`plan_text`)."""
    release = vllm_versions.release(vllm_version)
    style = {"description_width": "150px"}
    controls = {
        "model": W.Dropdown(options=bundled_model_names(), value=model, description="model", style=style),
        "tp": W.BoundedIntText(value=tp, min=1, max=64, description="tp", style=style),
        "dp": W.BoundedIntText(value=dp, min=1, max=1024, description="dp", style=style),
        "nodes": W.BoundedIntText(value=nodes, min=1, max=256, description="nodes", style=style),
        "gpus_per_node": W.BoundedIntText(value=gpus_per_node, min=1, max=16, description="gpus_per_node", style=style),
        "enable_expert_parallel": W.Checkbox(value=enable_expert_parallel, description="enable_expert_parallel"),
        "all2all_backend": W.Dropdown(options=[("(vLLM default)", "")] + [(b, b) for b in sorted(release.backends)], value=all2all_backend,
                                      description="all2all_backend", style=style),
        "eplb": W.Checkbox(value=eplb, description="enable EPLB"),
        "num_redundant_experts": W.BoundedIntText(value=num_redundant_experts, min=0, max=1024,
                                                  description="num_redundant_experts", style=style),
        "engine": W.Dropdown(options=["vllm", "epkit"], value=engine, description="engine", style=style),
        "gpus": W.SelectMultiple(options=sorted(GPU_MEMORY_BYTES), value=tuple(gpus), description="plan for GPUs",
                                 style=style),
    }
    out = W.Output(layout=W.Layout(border="1px solid #ddd", padding="6px"))

    def update(_change=None) -> None:
        v = {k: c.value for k, c in controls.items()}
        text = plan_text(v["model"], v["tp"], v["dp"], v["nodes"], v["gpus_per_node"], v["enable_expert_parallel"],
                         v["all2all_backend"] or None, v["num_redundant_experts"] if v["eplb"] else None,
                         v["engine"], vllm_version, tuple(v["gpus"]))
        out.clear_output(wait=True)
        with out:
            print(text)

    for c in controls.values():
        c.observe(update, names="value")
    update()
    return W.VBox([W.HBox([W.VBox(list(controls.values())[:6]), W.VBox(list(controls.values())[6:])]), out])
