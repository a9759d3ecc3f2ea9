"""Check rendered commands with vLLM's own argument parser, in a separate environment.

vLLM is far too heavy for epkit's own environment, so :data:`PARSER_SCRIPT` runs under
the Python of a venv that has it (``scripts/vllm_venv.sh`` makes one). Each rendered
argv is parsed there and compared with what the topology meant.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Sequence

from epkit.errors import TopologyError
from epkit.topology import Topology
from epkit.topology.render import NodeLaunch

PARSER_SCRIPT = Path(__file__).with_name("parse.py")


# parse.py exits with this status when vLLM cannot be imported under that Python.
NO_VLLM_STATUS = 3


def parse_with_vllm(argvs: Sequence[Sequence[str]], python: str | Path, timeout_s: float = 300) -> dict[str, Any]:
    """Parse ``vllm serve`` argv lists with the vLLM installed for ``python``.

    Raises :class:`TopologyError` naming ``python`` when it is missing, not runnable, has no
    vLLM, or its parser run fails or times out.
    """
    hint = "give the Python of a venv with vLLM (`bash scripts/vllm_venv.sh` makes ~/.cache/epkit/vllm-venv)"
    python = Path(python).expanduser()
    if not python.exists():
        raise TopologyError(f"--check-with-vllm {str(python)!r} does not exist; {hint}")
    if python.is_dir() or not os.access(python, os.X_OK):
        raise TopologyError(f"--check-with-vllm {str(python)!r} is not an executable Python; {hint}")
    try:
        proc = subprocess.run(
            [str(python), str(PARSER_SCRIPT)],
            input=json.dumps([list(a) for a in argvs]),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise TopologyError(f"--check-with-vllm {python}: vLLM's parser did not finish in {timeout_s:g} s") from None
    except OSError as exc:
        raise TopologyError(f"--check-with-vllm {python} cannot be run ({exc.strerror}); {hint}") from None
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    if proc.returncode == NO_VLLM_STATUS:
        raise TopologyError(f"--check-with-vllm {python} has no vLLM ({last}); {hint}")
    if proc.returncode != 0:
        raise TopologyError(f"--check-with-vllm {python}: vLLM's parser failed with exit status "
                            f"{proc.returncode}: {last or '(no output)'}")
    try:
        parsed = json.loads(proc.stdout)
        parsed["vllm_version"], parsed["results"]  # noqa: B018 - the keys every caller reads
    except (json.JSONDecodeError, TypeError, KeyError):
        raise TopologyError(f"--check-with-vllm {python} is not a Python that ran epkit's parser script "
                            f"(its output: {proc.stdout.strip()[:200]!r}); {hint}") from None
    return parsed


def expected_values(topology: Topology, launch: NodeLaunch, address: str | None = None) -> dict[str, Any]:
    """What vLLM should read from ``launch``'s argv for this topology."""
    argv = launch.argv
    headless = launch.role == "headless"
    address = address or topology.data_parallel_address
    spans = topology.tp_spans_nodes  # then no DP placement flag: vLLM infers it from --nnodes/--node-rank
    expected: dict[str, Any] = {
        "model": topology.model,
        "tensor_parallel_size": topology.tp,
        "data_parallel_size": topology.dp,
        "data_parallel_size_local": (topology.dp_per_node if not spans and (topology.nodes > 1 or topology.dp_local)
                                     else None),
        "data_parallel_start_rank": topology.node_start_rank(launch.node_index) if headless and not spans else None,
        "data_parallel_address": None if spans else address,
        "data_parallel_rpc_port": None if spans else topology.data_parallel_rpc_port,
        "nnodes": topology.nodes if spans else 1,
        "node_rank": launch.node_index if spans else 0,
        "enable_expert_parallel": topology.enable_expert_parallel,
        "all2all_backend": topology.all2all_backend or "allgather_reducescatter",
        "headless": headless,
        "api_server_count": None if headless else topology.api_server_count,
        "enable_eplb": topology.eplb is not None,
        "max_model_len": topology.max_model_len,
    }
    if topology.gpu_memory_utilization is not None:  # unset: the release's own default, whatever it is
        expected["gpu_memory_utilization"] = topology.gpu_memory_utilization
    if spans:
        expected["master_addr"] = address
        if topology.master_port is not None:  # unset: the release's own default
            expected["master_port"] = topology.master_port
    assert argv[2] == topology.model
    return expected


def _kv_transfer_problems(topology: Topology, got: dict[str, Any] | None, where: str) -> list[str]:
    """vLLM's KVTransferConfig against the topology's, field by field (the keys it sets; the rest are vLLM's
    defaults, e.g. a fresh engine_id and the platform's kv_buffer_device)."""
    if topology.kv_transfer_config is None:
        return [] if got is None else [f"{where}: kv_transfer_config parsed as {got!r}, topology sets none"]
    if got is None:
        return [f"{where}: kv_transfer_config parsed as None, topology means {topology.kv_transfer_config.to_json()}"]
    return [f"{where}: kv_transfer_config.{key} parsed as {got.get(key)!r}, topology means {want!r}"
            for key, want in topology.kv_transfer_config.explicit().items() if got.get(key) != want]


def compare(topology: Topology, launches: Sequence[NodeLaunch], results: Sequence[dict], version: str) -> list[str]:
    """Disagreements between vLLM's parse ``results`` of ``launches`` and what the topology means."""
    problems = []
    for launch, result in zip(launches, results):
        where = f"node {launch.node_index} ({launch.role})"
        if not result["ok"]:
            problems.append(f"{where}: vLLM {version} rejects the command: {result['error']}")
            continue
        got = result["values"]
        for key, want in expected_values(topology, launch).items():
            if got.get(key) != want:
                problems.append(f"{where}: {key} parsed as {got.get(key)!r}, topology means {want!r}")
        if topology.eplb is not None:
            for key, want in topology.eplb.explicit().items():
                have = (got.get("eplb_config") or {}).get(key)
                if have != want:
                    problems.append(f"{where}: eplb_config.{key} parsed as {have!r}, topology means {want!r}")
        problems += _kv_transfer_problems(topology, got.get("kv_transfer_config"), where)
    return problems


def check_many(
    items: Sequence[tuple[Topology, Sequence[NodeLaunch]]], python: str | Path
) -> tuple[str, list[list[str]]]:
    """Check several rendered topologies in one parser run; returns (vLLM version, problems per item)."""
    argvs = [launch.argv for _, launches in items for launch in launches]
    parsed = parse_with_vllm(argvs, python)
    results, out, i = parsed["results"], [], 0
    for topology, launches in items:
        out.append(compare(topology, launches, results[i : i + len(launches)], parsed["vllm_version"]))
        i += len(launches)
    return parsed["vllm_version"], out


def check_launches(topology: Topology, launches: Sequence[NodeLaunch], python: str | Path) -> list[str]:
    """One line per disagreement between vLLM's reading and the topology (empty: all agree)."""
    return check_many([(topology, launches)], python)[1][0]
