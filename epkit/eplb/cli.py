"""``epkit eplb``: simulate, compare policies, list valid redundant-expert counts, read vLLM logs.

    epkit eplb simulate  --ep 32 --nodes 4 --groups 8 --eplb-config '{"num_redundant_experts":32}' [--trace F | synthetic opts]
    epkit eplb compare   --ep 32 --nodes 4 --groups 8 --redundant 32 [--trace F | --reference | synthetic opts]
    epkit eplb redundant --experts 256 --ep 32      (or --model deepseek-ai/DeepSeek-V3-0324)
    epkit eplb log vllm.log
"""

from __future__ import annotations

import argparse
import sys
import time

import pandas as pd

from epkit.errors import EpkitError


def _synthetic_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("load (a recorded trace, or a synthetic one)")
    group.add_argument("--trace", help="epkit trace file (.npz/.json, see docs/eplb.md)")
    group.add_argument("--steps", type=int, default=3000)
    group.add_argument("--layers", type=int, default=58)
    group.add_argument("--experts", type=int, default=256)
    group.add_argument("--tokens", type=int, default=2048, help="tokens per step")
    group.add_argument("--top-k", type=int, default=8)
    group.add_argument("--skew", default="zipf", choices=["zipf", "lognormal", "uniform"])
    group.add_argument("--skew-param", type=float, default=1.0, help="Zipf exponent or lognormal sigma")
    group.add_argument("--drift-every", type=int, default=0, help="steps between hot-expert drifts (0: none)")
    group.add_argument("--drift-fraction", type=float, default=0.1)
    group.add_argument("--burst-prob", type=float, default=0.0)
    group.add_argument("--seed", type=int, default=0)


def _placement_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ep", type=int, help="EP ranks (GPUs); required unless --reference")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--groups", type=int, default=1, help="expert groups (DeepSeek-V3: 8)")
    parser.add_argument("--model", help="model name or config.json, for bytes per expert")


def _trace(args):
    from epkit.eplb.readers import read_trace
    from epkit.eplb.traces import synthetic_trace

    if args.trace:
        return read_trace(args.trace)
    return synthetic_trace(args.steps, args.layers, args.experts, args.tokens, args.top_k, args.skew,
                           args.skew_param, args.drift_every, args.drift_fraction, args.burst_prob, seed=args.seed)


def _need_ep(args) -> None:
    if args.ep is None:
        raise EpkitError("--ep (number of EP ranks) is required")


def _bytes_per_expert(model: str | None) -> float | None:
    if not model:
        return None
    from epkit.models import ModelSpec

    return ModelSpec.load(model).bytes_per_expert


def _simulate(args) -> int:
    from epkit.eplb.simulate import simulate

    _need_ep(args)
    trace = _trace(args)
    model = args.model or _bundled(trace.meta.get("model"))
    frame = simulate(trace, args.eplb_config, args.policy, num_ranks=args.ep, num_nodes=args.nodes,
                     num_groups=args.groups, bytes_per_expert=_bytes_per_expert(model))
    if args.csv:
        frame.to_csv(args.csv, index=False)
    print(format_simulation(frame, trace.load.shape, model))
    return 0


def _bundled(model: str | None) -> str | None:
    """A trace's model name when epkit knows its sizes (the built-in engine's dumps name theirs)."""
    from epkit.models import ModelSpec

    try:
        return model if model and ModelSpec.load(model) else None
    except EpkitError:
        return None


def format_simulation(frame: pd.DataFrame, shape: tuple[int, int, int], model: str | None) -> str:
    """``epkit eplb simulate``'s report: settings, no EPLB against the policy, one row per
    rearrangement; each table followed by a one-line legend of its columns."""
    from epkit.eplb.simulate import rearrangements, summary

    steps, layers, experts = shape
    cfg = frame.attrs["eplb_config"]
    gib = 2.0 ** 30
    has_bytes = frame["bytes_moved"].notna().any()

    def gib_text(values: pd.Series) -> pd.Series:
        return values.map(lambda b: f"{b / gib:.4g}" if pd.notna(b) else "n/a")

    head = (f"{steps} steps × {layers} MoE layers × {experts} experts on {frame.attrs['num_ranks']} EP ranks "
            f"({frame.attrs['num_physical']} physical slots, num_redundant_experts={cfg['num_redundant_experts']}); "
            f"policy {frame.attrs['policy']}, window_size {cfg['window_size']}, step_interval {cfg['step_interval']}; "
            + (f"bytes per expert from {model}" if has_bytes else "GiB_moved needs --model"))
    total = summary(frame)
    total = pd.DataFrame({"run": total["run"], "mean_balancedness": total["mean_balancedness"].round(4),
                          "min_balancedness": total["min_balancedness"].round(4),
                          "rearrangements": total["rearrangements"], "experts_moved": total["experts_moved"],
                          "GiB_moved": gib_text(total["bytes_moved"])})
    lines = [head, "", total.to_string(index=False),
             f"balancedness: per step, Σ layers mean ÷ Σ layers max rank load (1 = even), mean / min over the "
             f"{steps} steps; no EPLB: {experts} experts in contiguous blocks per rank, never moved; GiB_moved: "
             "expert copies × bytes per expert"]
    events = rearrangements(frame)
    if len(events):
        table = pd.DataFrame({
            "step": events["step"],
            "window_before": events["window_balancedness_before"].round(4),
            "window_after": events["window_balancedness_after"].round(4),
            "next_steps": events["next_steps"].astype(int),
            "next_kept": events["next_balancedness_kept"].round(4),
            "next_new": events["next_balancedness_new"].round(4),
            "experts_moved": events["experts_moved"],
            "GiB_moved": gib_text(events["bytes_moved"]),
            "policy_ms": events["rebalance_ms"].round(2),
        })
        lines += ["", table.to_string(index=False, na_rep="-"),
                  "window_before/after: balancedness of the window the policy saw under the old / new placement "
                  "(predicted; the engine logs it as 'window balancedness a -> b'); next_kept/new: mean per-step "
                  "balancedness over the next_steps steps until the next rearrangement, old placement kept / new "
                  "one (realised); policy_ms: time to compute the placement"]
    return "\n".join(lines)


def _compare(args) -> int:
    from epkit.eplb.placement import Placement, balancedness, experts_moved
    from epkit.eplb.policies import POLICIES, get_policy
    from epkit.eplb.reference import load_reference_cases

    names = args.policies.split(",")
    for name in names:
        get_policy(name)
    if args.reference:
        jobs = [(c["name"], c["weight"], c["num_replicas"], c["num_groups"], c["num_nodes"], c["num_gpus"])
                for c in load_reference_cases()]
    else:
        _need_ep(args)
        weight = _trace(args).total()
        jobs = [("trace", weight, weight.shape[1] + args.redundant, args.groups, args.nodes, args.ep)]
    bytes_per_expert = _bytes_per_expert(args.model)
    rows = []
    for case, weight, physical, groups, nodes, ranks in jobs:
        start = Placement.linear(weight.shape[0], weight.shape[1], physical)
        for name in names:
            began = time.perf_counter()
            placement = POLICIES[name](weight, physical, groups, nodes, ranks, current=start)
            elapsed = (time.perf_counter() - began) * 1e3
            loads = placement.rank_loads(weight, ranks)
            moved = int(experts_moved(start, placement, ranks).sum())
            rows.append({"case": case, "policy": name, "balancedness": round(balancedness(loads), 5),
                         "max_gpu_load": round(float(loads.max(1).sum()), 2), "experts_moved": moved,
                         "bytes_moved": moved * bytes_per_expert if bytes_per_expert else None,
                         "compute_ms": round(elapsed, 2)})
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


def _redundant(args) -> int:
    from epkit.eplb.config import valid_redundant

    experts = args.experts
    if args.model:
        from epkit.models import ModelSpec

        experts = ModelSpec.load(args.model).num_experts
    if not experts:
        raise EpkitError("give --experts N or --model NAME")
    values = valid_redundant(experts, args.ep, args.limit)
    print(f"valid num_redundant_experts for {experts} experts on EP={args.ep}: {', '.join(map(str, values))} …")
    print(f"(physical experts per rank: {', '.join(str((experts + v) // args.ep) for v in values)})")
    return 0


def _log(args) -> int:
    from epkit.eplb.readers import read_vllm_log

    frame = read_vllm_log(args.path)
    if frame.empty:
        print(f"{args.path}: no 'EPLB step' lines (was log_balancedness on?)")
        return 1
    print(frame.to_string(index=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epkit eplb", description="EPLB policies and the what-if simulator")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="replay a load trace through vLLM's EPLB schedule")
    _placement_args(sim)
    sim.add_argument("--eplb-config", default="{}", help="vLLM's --eplb-config JSON")
    sim.add_argument("--policy", help="policy (default: the config's policy); see `epkit eplb compare --help`")
    sim.add_argument("--csv", help="write the per-step table here")
    _synthetic_args(sim)
    sim.set_defaults(run=_simulate)

    cmp_ = sub.add_parser("compare", aliases=["rebalance"], help="run policies once on a load and compare them")
    _placement_args(cmp_)
    cmp_.add_argument("--redundant", type=int, default=0, help="num_redundant_experts")
    cmp_.add_argument("--policies", default="default,global,refined,balanced,sticky")
    cmp_.add_argument("--reference", action="store_true", help="use the bundled reference cases instead")
    _synthetic_args(cmp_)
    cmp_.set_defaults(run=_compare)

    red = sub.add_parser("redundant", help="list num_redundant_experts values valid for an EP size")
    red.add_argument("--ep", type=int, required=True)
    red.add_argument("--experts", type=int)
    red.add_argument("--model")
    red.add_argument("--limit", type=int, default=8)
    red.set_defaults(run=_redundant)

    log = sub.add_parser("log", help="read vLLM's 'EPLB step' balancedness lines")
    log.add_argument("path")
    log.set_defaults(run=_log)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (EpkitError, ValueError) as exc:
        print(f"epkit eplb {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
