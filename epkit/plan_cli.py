"""``epkit plan SPEC.yaml | --flags``: per-node commands, derived sizes, memory plan, warnings."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from epkit.errors import EpkitError
from epkit.plan import GIB, derived_sizes
from epkit.render import render
from epkit.spec import PlanSpec, load_spec

# CLI flag -> topology field, for specs given as flags (vLLM's spellings plus short forms).
FLAG_FIELDS: dict[str, tuple[str, Any]] = {
    "--model": ("model", str),
    "--tensor-parallel-size": ("tp", int),
    "--data-parallel-size": ("dp", int),
    "--nodes": ("nodes", int),
    "--gpus-per-node": ("gpus_per_node", int),
    "--data-parallel-size-local": ("dp_local", int),
    "--all2all-backend": ("all2all_backend", str),
    "--eplb-config": ("eplb", str),
    "--api-server-count": ("api_server_count", int),
    "--data-parallel-address": ("data_parallel_address", str),
    "--data-parallel-rpc-port": ("data_parallel_rpc_port", int),
    "--gloo-socket-ifname": ("gloo_socket_ifname", str),
    "--nccl-socket-ifname": ("nccl_socket_ifname", str),
    "--engine": ("engine", str),
    "--vllm-version": ("vllm_version", str),
    "--model-config": ("model_config", str),
}
ALIASES = {"--tensor-parallel-size": ["--tp"], "--data-parallel-size": ["--dp"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epkit plan", description=__doc__)
    p.add_argument("spec", nargs="?", help="deployment spec (YAML/JSON); or give the topology as flags")
    for flag, (dest, kind) in FLAG_FIELDS.items():
        p.add_argument(flag, *ALIASES.get(flag, []), dest=dest, type=kind, default=None)
    p.add_argument("--enable-expert-parallel", dest="enable_expert_parallel", action="store_true", default=None)
    p.add_argument("--enable-eplb", action="store_true", help="turn EPLB on (with --eplb-config for its keys)")
    p.add_argument("--allow-replaced-backend", dest="allow_replaced_backend", action="store_true", default=None)
    p.add_argument("--eplb-flag-style", dest="eplb_flag_style", choices=("json", "dotted"), default=None)
    p.add_argument("--gpu", action="append", dest="gpus", help="GPU type to plan for (H100, H200, H20, NAME=GiB); repeatable")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--check-with-vllm", metavar="PYTHON", help="also parse every command with the vLLM of this Python")
    return p


def spec_from_args(args: argparse.Namespace) -> PlanSpec:
    """A :class:`PlanSpec` from a spec file, with any flags given overriding its fields."""
    base: dict[str, Any] = {}
    if args.spec:
        loaded = load_spec(args.spec)
        base = loaded.topology.to_dict()
        plan = {"gpus": list(loaded.gpus), "gpu_memory_utilization": loaded.gpu_memory_utilization,
                "max_model_len": loaded.max_model_len, "runtime_reserve_gib": loaded.runtime_reserve_gib}
    else:
        plan = {}
    for dest, _ in FLAG_FIELDS.values():
        if getattr(args, dest) is not None:
            base[dest] = getattr(args, dest)
    for dest in ("enable_expert_parallel", "allow_replaced_backend", "eplb_flag_style"):
        if getattr(args, dest) is not None:
            base[dest] = getattr(args, dest)
    if args.enable_eplb and base.get("eplb") is None:
        base["eplb"] = {}
    if "model" not in base:
        raise EpkitError("epkit plan: give a spec file or --model (and the other topology flags)")
    if args.gpus:
        plan["gpus"] = args.gpus
    if args.gpu_memory_utilization is not None:
        plan["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.max_model_len is not None:
        plan["max_model_len"] = args.max_model_len
    return PlanSpec.from_dict({**base, "plan": plan}, source=args.spec or "flags")


def plan_report(spec: PlanSpec) -> dict[str, Any]:
    """Everything ``epkit plan`` prints, as plain data."""
    topology = spec.topology
    launches = render(topology)
    return {
        "topology": topology.to_dict(),
        "nodes": [
            {"node": l.node_index, "role": l.role, "argv": list(l.argv), "env": dict(l.env), "shell": l.shell()}
            for l in launches
        ],
        "derived": derived_sizes(topology),
        "model": topology.spec.summary(),
        "memory": [m.to_dict() for m in spec.memory_plans()],
        "warnings": topology.warnings(),
    }


def format_text(report: dict[str, Any]) -> str:
    d = report["derived"]
    out = []
    for node in report["nodes"]:
        out.append(f"# node {node['node'] + 1} of {len(report['nodes'])} ({node['role']})")
        out.append(node["shell"])
        out.append("")
    out.append("# derived")
    out.append(
        f"  ep_size = tp × dp = {d['tp']} × {d['dp']} = {d['ep_size']}" if d["ep_size"] > 1
        else "  expert parallelism off: experts are tensor-parallel"
    )
    out.append(f"  GPUs: {d['world_size']} ({d['nodes']} node(s) × {d['gpus_per_node_used']}); DP ranks per node {d['dp_per_node']}; "
               f"start ranks {d['node_start_ranks']}")
    out.append(f"  experts: {d['num_logical_experts']} logical + {d['num_redundant_experts']} redundant = "
               f"{d['num_physical_experts']} physical" + (f", {d['experts_per_rank']:g} per EP rank" if d["experts_per_rank"] else ""))
    out.append(f"  MoE layers {d['num_moe_layers']}; bytes per expert {d['bytes_per_expert'] / 1e6:.1f} MB; "
               f"experts per rank {d['expert_bytes_per_rank'] / GIB:.2f} GiB; "
               f"EPLB overhead per rank {d['eplb_overhead_bytes_per_rank'] / GIB:.2f} GiB "
               f"({d['eplb_overhead_bytes_per_rank'] / 1e9:.2f} GB)")
    out.append(f"  backend advice: {d['backend_advice']}")
    out.append("")
    out.append("# memory per GPU (GiB)")
    out.append(f"  {'gpu':<8}{'total':>8}{'budget':>8}{'dense':>8}{'experts':>9}{'eplb':>7}{'kv':>8}{'kv tokens':>11}  verdict")
    for m in report["memory"]:
        out.append(
            f"  {m['gpu']:<8}{m['gpu_memory_bytes'] / GIB:>8.1f}{m['budget_bytes'] / GIB:>8.1f}"
            f"{m['non_expert_weight_bytes'] / GIB:>8.1f}{m['expert_weight_bytes'] / GIB:>9.1f}"
            f"{m['eplb_overhead_bytes'] / GIB:>7.2f}{m['kv_cache_bytes'] / GIB:>8.1f}{m['kv_cache_tokens']:>11}  "
            f"{'fits' if m['fits'] else 'DOES NOT FIT'}: {m['reason']}"
        )
    if report["warnings"]:
        out.append("")
        out.append("# warnings")
        out += [f"  - {w}" for w in report["warnings"]]
    if report.get("vllm_check") is not None:
        out.append("")
        out.append("# checked with vLLM's own parser")
        out += [f"  - {p}" for p in report["vllm_check"]] or ["  every command parses to the intended values"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        report = plan_report(spec)
        if args.check_with_vllm:
            from epkit.vllm_check import check_launches

            report["vllm_check"] = check_launches(spec.topology, render(spec.topology), args.check_with_vllm)
    except EpkitError as exc:
        message = str(exc)
        if args.spec and not message.startswith(args.spec):
            message = f"{args.spec}: {message}"
        print(f"epkit plan: error: {message}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(format_text(report))
    return 1 if report.get("vllm_check") else 0


if __name__ == "__main__":
    sys.exit(main())
