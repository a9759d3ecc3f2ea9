"""``epkit plan SPEC.yaml | --flags``: per-node commands, derived sizes, memory plan, warnings.

A disaggregated spec (``prefill:`` / ``decode:`` instances) is planned instance by instance: each one's
per-node commands and memory plan under its label (``prefill0``, ``decode0``…), then the router and the
KV connector."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from epkit.errors import EpkitError, TopologyError
from epkit.topology import ENGINE_FLAG_FIELDS, EPLBConfig, human_readable_int
from epkit.topology.plan import GIB, GPU_MEMORY_BYTES, derived_sizes
from epkit.topology.render import render
from epkit.topology.spec import DEFAULT_GPUS, DisaggPlanSpec, PlanSpec, load_spec
from epkit.vllm.versions import DEFAULT_VLLM_VERSION


def _tokens(text: str) -> int:
    """A token count as vLLM reads --max-model-len (argparse shows this error's text)."""
    try:
        return human_readable_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count; e.g. 32768, 32k (= 32000) or 32K (= 32768)")

# CLI flag -> (topology field, type, help), for specs given as flags (vLLM's spellings plus short forms).
FLAG_FIELDS: dict[str, tuple[str, Any, str]] = {
    "--model": ("model", str, "model: a bundled name (e.g. deepseek-ai/DeepSeek-V3-0324) or any name with --model-config"),
    "--model-config": ("model_config", str, "path to the model's Hugging Face config.json when it is not bundled"),
    "--tensor-parallel-size": ("tp", int, "TP size per DP rank (default 1)"),
    "--data-parallel-size": ("dp", int, "DP size over all nodes (default 1)"),
    "--nodes": ("nodes", int, "number of nodes (default 1)"),
    "--gpus-per-node": ("gpus_per_node", int, "GPUs on each node (default 8)"),
    "--data-parallel-size-local": ("dp_local", int, "DP ranks per node (default dp / nodes)"),
    "--all2all-backend": ("all2all_backend", str, "EP all2all backend (default: the release's)"),
    "--eplb-config": ("eplb", str, "EPLB keys as JSON, e.g. '{\"num_redundant_experts\":32}' (turns EPLB on); "
                      "vLLM's dotted form --eplb-config.KEY VALUE works too"),
    "--api-server-count": ("api_server_count", int, "API server processes on the primary node"),
    "--data-parallel-address": ("data_parallel_address", str, "primary node's IP or hostname (needed for nodes > 1)"),
    "--data-parallel-rpc-port": ("data_parallel_rpc_port", int, "DP RPC port (1-65535)"),
    "--master-port": ("master_port", int, "torch.distributed port of TP across nodes (tp > gpus_per_node; "
                      "1-65535; default vLLM's)"),
    "--kv-transfer-config": ("kv_transfer_config", str, "KV connector of one disaggregated prefill/decode side as "
                             "JSON, e.g. '{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_producer\"}'"),
    "--gloo-socket-ifname": ("gloo_socket_ifname", str, "GLOO_SOCKET_IFNAME exported on every node (e.g. eth0)"),
    "--nccl-socket-ifname": ("nccl_socket_ifname", str, "NCCL_SOCKET_IFNAME exported on every node"),
    **{ENGINE_FLAG_FIELDS[name]: (name, kind, help_) for name, kind, help_ in (  # flags spelled in topology.py
        ("max_model_len", _tokens, "the engine's context length in tokens; the memory plan checks that the KV cache "
                               "holds one such sequence (default: the model's; 32k = 32000, 32K = 32768 as vLLM reads it)"),
        ("gpu_memory_utilization", float, "the share of GPU memory the engine takes and the plan budgets "
                                          "(0 < x <= 1, default 0.9)"),
    )},
    "--engine": ("engine", str, "vllm or epkit (the built-in engine, same flags)"),
    "--vllm-version": ("vllm_version", str, "vLLM release the commands target (default %s)" % DEFAULT_VLLM_VERSION),
}
ALIASES = {"--tensor-parallel-size": ["--tp"], "--data-parallel-size": ["--dp"]}
METAVARS = {"model": "NAME", "model_config": "PATH", "all2all_backend": "BACKEND", "eplb": "JSON",
            "kv_transfer_config": "JSON",
            "data_parallel_address": "HOST", "data_parallel_rpc_port": "PORT", "master_port": "PORT", "gloo_socket_ifname": "IFNAME",
            "nccl_socket_ifname": "IFNAME", "max_model_len": "TOKENS", "gpu_memory_utilization": "FRACTION",
            "engine": "ENGINE", "vllm_version": "VERSION"}
EPLB_DOTTED = "--eplb-config."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epkit plan", description=__doc__,
        epilog="Flags override the spec file's fields. Exit status: 0 planned, 1 vLLM's parser disagrees "
               "(--check-with-vllm), 2 bad input (nothing is printed on stdout).")
    p.add_argument("spec", nargs="?", help="deployment spec (YAML/JSON); or give the topology as flags")
    for flag, (dest, kind, help_) in FLAG_FIELDS.items():
        p.add_argument(flag, *ALIASES.get(flag, []), dest=dest, type=kind, default=None, help=help_,
                       metavar=METAVARS.get(dest, "N"))
    p.add_argument("--enable-expert-parallel", dest="enable_expert_parallel", action="store_true", default=None,
                   help="expert parallelism: ep_size = tp × dp")
    p.add_argument("--enable-eplb", action="store_true", help="turn EPLB on (with --eplb-config for its keys)")
    p.add_argument("--allow-replaced-backend", dest="allow_replaced_backend", action="store_true", default=None,
                   help="render a backend the target release silently replaces (with a warning)")
    p.add_argument("--eplb-flag-style", dest="eplb_flag_style", choices=("json", "dotted"), default=None,
                   help="render EPLB keys as --eplb-config '{…}' (json) or --eplb-config.KEY VALUE (dotted)")
    p.add_argument("--gpu", action="append", dest="gpus", metavar="GPU",
                   help=f"GPU type to plan for ({', '.join(GPU_MEMORY_BYTES)} or NAME=GiB); repeatable "
                        f"(default: the spec's plan.gpus, else {', '.join(DEFAULT_GPUS)})")
    p.add_argument("--runtime-reserve-gib", type=float, default=None, metavar="GIB",
                   help="GiB per GPU kept for activations, CUDA graphs and NCCL buffers (default 2)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="text for people, json for machines")
    p.add_argument("--check-with-vllm", metavar="PYTHON",
                   help="also parse every command with the vLLM installed for this Python "
                        "(e.g. ~/.cache/epkit/vllm-venv/bin/python)")
    return p


def split_eplb_dotted(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Pull vLLM's per-key ``--eplb-config.KEY VALUE`` (or ``=VALUE``) out of ``argv``.

    Values are read as vLLM reads them: JSON where they parse (``32``, ``true``), else a
    human-readable integer (``1k``), else the string.
    """
    rest: list[str] = []
    keys: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith(EPLB_DOTTED):
            rest.append(arg)
            i += 1
            continue
        key, eq, text = arg[len(EPLB_DOTTED):].partition("=")
        if not key:
            raise TopologyError(f"{arg!r}: give a key, e.g. {EPLB_DOTTED}num_redundant_experts 32")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise TopologyError(f"{EPLB_DOTTED}{key} has no value (e.g. {EPLB_DOTTED}{key} 32)")
            text = argv[i + 1]
            i += 1
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:
                value = human_readable_int(text)  # as vLLM: --eplb-config.window_size 1k
            except ValueError:
                value = text
        if key in keys and keys[key] != value:
            raise TopologyError(f"{EPLB_DOTTED}{key} is given twice ({keys[key]!r} and {value!r}); give it once")
        keys[key] = value
        i += 1
    return rest, keys


def _disagg_spec(args: argparse.Namespace, loaded: DisaggPlanSpec, dotted: dict[str, Any] | None) -> DisaggPlanSpec:
    """A disaggregated spec takes only the planning flags: its topology fields belong to one instance each."""
    given = [flag for flag, (dest, _, _) in FLAG_FIELDS.items() if getattr(args, dest) is not None]
    given += [f"--{d.replace('_', '-')}" for d in ("enable_expert_parallel", "allow_replaced_backend",
                                                   "eplb_flag_style") if getattr(args, d) is not None]
    given += ["--enable-eplb"] * bool(args.enable_eplb) + [EPLB_DOTTED + "…"] * bool(dotted)
    if given:
        raise TopologyError(f"{args.spec} is a disaggregated spec (prefill/decode instances): {given[0]} would not "
                            "say which instance it sets; edit the instance in the file (allowed flags here: --gpu, "
                            "--runtime-reserve-gib, --format, --check-with-vllm)")
    if args.gpus:
        loaded = replace(loaded, gpus=tuple(args.gpus))
    if args.runtime_reserve_gib is not None:
        loaded = replace(loaded, runtime_reserve_gib=args.runtime_reserve_gib)
    return loaded


def spec_from_args(args: argparse.Namespace, dotted: dict[str, Any] | None = None) -> PlanSpec | DisaggPlanSpec:
    """A :class:`PlanSpec` from a spec file, with any flags given overriding its fields (a disaggregated spec
    file gives a :class:`DisaggPlanSpec`, with only the planning flags applied)."""
    base: dict[str, Any] = {}
    plan: dict[str, Any] = {}
    if args.spec:
        loaded = load_spec(args.spec)
        if isinstance(loaded, DisaggPlanSpec):
            return _disagg_spec(args, loaded, dotted)
        base = loaded.topology.to_dict()
        plan = {"gpus": list(loaded.gpus), "runtime_reserve_gib": loaded.runtime_reserve_gib}
    for dest, _, _ in FLAG_FIELDS.values():
        if getattr(args, dest) is not None:
            base[dest] = getattr(args, dest)
    for dest in ("enable_expert_parallel", "allow_replaced_backend", "eplb_flag_style"):
        if getattr(args, dest) is not None:
            base[dest] = getattr(args, dest)
    if dotted:
        eplb = base.get("eplb")
        if isinstance(eplb, str):
            eplb = EPLBConfig.from_json(eplb).explicit()
        eplb = dict(eplb or {})
        for key, value in dotted.items():
            if key in eplb and eplb[key] != value:
                raise TopologyError(f"eplb_config.{key} is {eplb[key]!r} in --eplb-config (or the spec) but "
                                    f"{value!r} in {EPLB_DOTTED}{key}; give it once")
            eplb[key] = value
        base["eplb"] = eplb
        if args.eplb_flag_style is None and not args.eplb:
            base["eplb_flag_style"] = "dotted"  # render it the way it was written
    if args.enable_eplb and base.get("eplb") is None:
        base["eplb"] = {}
    if base.get("model") is None:
        raise TopologyError("topology.model is missing: give a spec file or --model (and the other topology flags)")
    if args.gpus:
        plan["gpus"] = args.gpus
    if args.runtime_reserve_gib is not None:
        plan["runtime_reserve_gib"] = args.runtime_reserve_gib
    return PlanSpec.from_dict({**base, "plan": plan}, source=args.spec or "command line")


def plan_report(spec: PlanSpec | DisaggPlanSpec) -> dict[str, Any]:
    """Everything ``epkit plan`` prints, as plain data."""
    if isinstance(spec, DisaggPlanSpec):
        return disagg_report(spec)
    return _topology_report(spec.topology, spec.memory_plans())


def disagg_report(spec: DisaggPlanSpec) -> dict[str, Any]:
    """A disaggregated spec's plan: every instance's report under its label, the router, the KV connector."""
    d = spec.disagg
    plans = dict(spec.memory_plans())
    instances = [{"label": label, "role": role, "index": index, "kv_role": t.kv_transfer_config.kv_role,
                  **_topology_report(t, plans[label])} for label, (role, index, t) in zip(d.labels, d.instances)]
    return {"kind": "disagg", "pd": d.pd, "gpus": d.gpus, "block_size": d.block_size, "model": d.model,
            "kv_transfer_config": d.kv_transfer_config.explicit(), "router": d.router.to_dict(),
            "instances": instances, "warnings": d.warnings()}


def _topology_report(topology: Any, memory: list) -> dict[str, Any]:
    launches = render(topology)
    return {
        "topology": topology.to_dict(),
        "nodes": [
            {"node": l.node_index, "role": l.role, "argv": list(l.argv), "env": dict(l.env), "shell": l.shell()}
            for l in launches
        ],
        "derived": derived_sizes(topology),
        "model": topology.spec.summary(),
        "memory": [m.to_dict() for m in memory],
        "warnings": topology.warnings(),
    }


def format_disagg_text(report: dict[str, Any]) -> str:
    """The text of a disaggregated plan: each instance as ``epkit plan`` prints one, under its label."""
    out = []
    for inst in report["instances"]:
        out.append(f"## {inst['label']}: {inst['role']} instance {inst['index'] + 1}")
        out.append(format_text({**inst, "warnings": []}))  # the warnings come once, below, named by instance
        out.append("")
    router = report["router"]
    out.append(f"# {report['pd']}: {len(report['instances'])} instances, {report['gpus']} GPUs, model "
               f"{report['model']}, KV block size {report['block_size']}")
    kv = json.dumps(report["kv_transfer_config"])
    roles = sorted({inst.get("kv_role") for inst in report["instances"]} - {None})
    out.append(f"  kv transfer (each instance's --kv-transfer-config above): {kv}"
               + (f"; the instances set kv_role {', '.join(roles)}" if len(roles) > 1 else ""))
    out.append(f"  router: epkit proxy --policy {router['policy']} on {router['on']}, port "
               f"{router['port'] if router['port'] is not None else '(a free one)'}")
    if report["warnings"]:
        out += ["", "# warnings"] + [f"  - {w}" for w in report["warnings"]]
    if report.get("vllm_check") is not None:
        out += ["", "# checked with vLLM's own parser"]
        out += [f"  - {p}" for p in report["vllm_check"]] or ["  every command parses to the intended values"]
    return "\n".join(out)


def format_text(report: dict[str, Any]) -> str:
    if report.get("kind") == "disagg":
        return format_disagg_text(report)
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
    if d["tp_spans_nodes"]:
        out.append(f"  GPUs: {d['world_size']} ({d['nodes']} node(s) × {d['gpus_per_node_used']}); tensor parallelism "
                   f"across nodes: one TP group of {d['tp']}, {d['tp_per_node']} ranks per node (node ranks "
                   f"0..{d['nodes'] - 1}), dp=1")
    else:
        out.append(f"  GPUs: {d['world_size']} ({d['nodes']} node(s) × {d['gpus_per_node_used']}); DP ranks per node "
                   f"{d['dp_per_node']}; start ranks {d['node_start_ranks']}")
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


def _check_with_vllm(spec: PlanSpec | DisaggPlanSpec, python: str) -> list[str]:
    """vLLM's parser on every command (each vLLM instance's, for a disaggregated spec), by instance."""
    from epkit.vllm.check import check_launches, check_many

    if isinstance(spec, PlanSpec):
        return check_launches(spec.topology, render(spec.topology), python)
    items = [(label, t) for label, (_, _, t) in zip(spec.disagg.labels, spec.disagg.instances) if t.engine == "vllm"]
    if not items:
        return []
    _, problems = check_many([(t, render(t)) for _, t in items], python)
    return [f"{label}: {p}" for (label, _), found in zip(items, problems) for p in found]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, dotted = split_eplb_dotted(argv)
    except TopologyError as exc:
        parser.error(str(exc))  # exits 2 with argparse's usage line
    args = parser.parse_args(argv)
    try:
        spec = spec_from_args(args, dotted)
        report = plan_report(spec)
        if args.check_with_vllm:
            report["vllm_check"] = _check_with_vllm(spec, args.check_with_vllm)
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
