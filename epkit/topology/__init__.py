"""Describe a deployment: the model's sizes, the topology that runs it, its commands and memory plan.

    from epkit.topology import Topology, render
    topology = Topology(model="deepseek-ai/DeepSeek-V3-0324", dp=16, nodes=2, gpus_per_node=8)
    launches = render(topology, address="10.0.0.1")  # one NodeLaunch (argv, env, role) per node

Pure: nothing here starts a process (``epkit.launch`` does). ``models`` reads Hugging Face
``config.json`` files (bundled ones in ``models/``), ``topology`` checks a deployment and ``eplb``
its EPLB keys, ``render`` translates it to vLLM's or the built-in engine's flags, ``plan`` sizes GPU
memory, ``spec`` reads ``epkit plan`` spec files, ``warnings`` names legal but probably unmeant
choices and ``backends`` is the all2all backend table shared with the engine. ``kv_transfer`` is vLLM's
``--kv-transfer-config`` and ``disagg`` a disaggregated prefill/decode deployment (``DisaggTopology``).
"""

from epkit.topology.disagg import DisaggTopology, RouterConfig
from epkit.topology.eplb import EPLBConfig, valid_redundant_experts
from epkit.topology.kv_transfer import KVTransferConfig
from epkit.topology.models import ModelSpec, bundled_model_names
from epkit.topology.plan import MemoryPlan, memory_plan
from epkit.topology.render import NodeLaunch, render
from epkit.topology.topology import ENGINE_FLAG_FIELDS, Topology, human_readable_int

__all__ = [
    "DisaggTopology", "ENGINE_FLAG_FIELDS", "EPLBConfig", "KVTransferConfig", "MemoryPlan", "ModelSpec", "NodeLaunch",
    "RouterConfig", "Topology", "bundled_model_names", "human_readable_int", "memory_plan", "render",
    "valid_redundant_experts",
]
