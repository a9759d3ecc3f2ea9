"""``epkit eplb``: simulate, compare policies, list valid redundant-expert counts, read vLLM logs.

    epkit eplb simulate  --ep 32 --nodes 4 --groups 8 --eplb-config '{"num_redundant_experts":32}' [--trace F | synthetic opts]
    epkit eplb compare   --ep 32 --nodes 4 --groups 8 --redundant 32 [--trace F | synthetic opts]
    epkit eplb compare   --reference
    epkit eplb redundant --experts 256 --ep 32      (or --model deepseek-ai/DeepSeek-V3-0324)
    epkit eplb log vllm.log
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zipfile

import pandas as pd

from epkit.errors import EpkitError


def _count(minimum: int):
    """argparse type: an integer >= ``minimum``, with a message naming the value and the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _real(minimum: float, maximum: float | None = None, above: bool = False):
    """argparse type: a finite number in [minimum, maximum] (or > minimum with ``above``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        low_ok = value > minimum if above else value >= minimum
        if value != value or not low_ok or (maximum is not None and value > maximum):
            bound = (f"> {minimum}" if above else f">= {minimum}") + (f" and <= {maximum}" if maximum is not None else "")
            raise argparse.ArgumentTypeError(f"{text} must be a number {bound}")
        return value
    parse.__name__ = "number"
    return parse


def _policy_list() -> str:
    from epkit.eplb.policies import POLICIES

    lines = [f"  {name:<9} {(fn.__doc__ or '').strip().splitlines()[0].replace('``', '')}" for name, fn in POLICIES.items()]
    return "policies (the POLICIES dict; --policy, --policies):\n" + "\n".join(lines)


def _synthetic_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("load (a recorded trace, or a synthetic one)")
    group.add_argument("--trace", metavar="FILE", help="epkit trace file (.npz/.json, see docs/eplb.md); the "
                       "synthetic options below are then ignored")
    group.add_argument("--steps", type=_count(1), default=3000, help="synthetic: forward steps (default %(default)s)")
    group.add_argument("--layers", type=_count(1), default=58, help="synthetic: MoE layers (default %(default)s)")
    group.add_argument("--experts", type=_count(1), default=256, help="synthetic: logical experts per layer "
                       "(default %(default)s)")
    group.add_argument("--tokens", type=_count(1), default=2048, help="synthetic: tokens per step (default %(default)s)")
    group.add_argument("--top-k", type=_count(1), default=8, help="synthetic: experts per token (default %(default)s)")
    group.add_argument("--skew", default="zipf", choices=["zipf", "lognormal", "uniform"],
                       help="synthetic: how expert popularity is drawn (default %(default)s)")
    group.add_argument("--skew-param", type=_real(0.0), default=1.0, help="Zipf exponent or lognormal sigma "
                       "(default %(default)s)")
    group.add_argument("--drift-every", type=_count(0), default=0, help="steps between hot-expert drifts (0: none)")
    group.add_argument("--drift-fraction", type=_real(0.0, 1.0), default=0.1,
                       help="share of experts whose popularity moves at each drift (default %(default)s)")
    group.add_argument("--burst-prob", type=_real(0.0, 1.0), default=0.0,
                       help="probability that a step is a burst on a few experts (default %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="synthetic: random seed (default %(default)s)")


def _placement_args(parser: argparse.ArgumentParser, reference: bool = False) -> None:
    parser.add_argument("--ep", type=_count(1), metavar="RANKS", required=not reference,
                        help="EP ranks (GPUs)" + ("; required unless --reference" if reference else ""))
    parser.add_argument("--nodes", type=_count(1), default=1, help="nodes the EP ranks span (default %(default)s)")
    parser.add_argument("--groups", type=_count(1), default=1, help="expert groups (DeepSeek-V3: 8; default "
                        "%(default)s)")
    parser.add_argument("--model", metavar="NAME", help="model name or config.json, for bytes per expert "
                        "(bytes moved are left out without it)")


def _trace(args):
    from epkit.eplb.readers import read_trace
    from epkit.eplb.traces import synthetic_trace

    if args.trace:
        _need_file("--trace", args.trace)
        try:
            return read_trace(args.trace)
        except (ValueError, OSError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as exc:
            if isinstance(exc, EpkitError) or args.trace in str(exc):
                raise
            raise EpkitError(f"--trace {args.trace}: not an epkit EPLB trace ({type(exc).__name__}: {exc}); "
                             "see docs/eplb.md for the format") from exc
    return synthetic_trace(args.steps, args.layers, args.experts, args.tokens, args.top_k, args.skew,
                           args.skew_param, args.drift_every, args.drift_fraction, args.burst_prob, seed=args.seed)


def _need_file(flag: str, path: str) -> None:
    if not os.path.exists(path):
        raise EpkitError(f"{flag} {path!r} does not exist")
    if not os.path.isfile(path):
        raise EpkitError(f"{flag} {path!r} is not a file")


def _need_ep(args) -> None:
    if args.ep is None:
        raise EpkitError("--ep (number of EP ranks) is required")


def _bytes_per_expert(model: str | None) -> float | None:
    if not model:
        return None
    from epkit.topology.models import ModelSpec

    return ModelSpec.load(model).bytes_per_expert


def _simulate(args) -> int:
    from epkit.eplb.simulate import simulate

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
    from epkit.topology.models import ModelSpec

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
        from epkit.topology.models import ModelSpec

        experts = ModelSpec.load(args.model).num_experts
    if not experts:
        raise EpkitError("give --experts N or --model NAME")
    values = valid_redundant(experts, args.ep, args.limit)
    print(f"valid num_redundant_experts for {experts} experts on EP={args.ep}: {', '.join(map(str, values))} …")
    print(f"(physical experts per rank: {', '.join(str((experts + v) // args.ep) for v in values)})")
    return 0


def _log(args) -> int:
    from epkit.eplb.readers import read_vllm_log

    _need_file("log", args.path)
    frame = read_vllm_log(args.path)
    if frame.empty:
        print(f"{args.path}: no 'EPLB step' lines (was log_balancedness on?)")
        return 1
    print(frame.to_string(index=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from epkit.eplb.policies import POLICIES

    policies = _policy_list()
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="epkit eplb", description="EPLB policies and the what-if simulator",
                                     epilog=policies, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser("simulate", help="replay a load trace through vLLM's EPLB schedule",
                         description="Replay a load trace (recorded, or synthetic) through vLLM's EPLB schedule:\n"
                                     "a rearrangement every step_interval steps from the last window_size steps.",
                         epilog=policies, formatter_class=raw)
    _placement_args(sim)
    sim.add_argument("--eplb-config", default="{}", metavar="JSON",
                     help="vLLM's --eplb-config JSON, e.g. '{\"num_redundant_experts\":32,\"step_interval\":100}'")
    sim.add_argument("--policy", choices=list(POLICIES), metavar="POLICY",
                     help=f"one of {', '.join(POLICIES)} (default: the config's policy, else default)")
    sim.add_argument("--csv", metavar="FILE", help="write the per-step table here")
    _synthetic_args(sim)
    sim.set_defaults(run=_simulate)

    cmp_ = sub.add_parser("compare", aliases=["rebalance"], help="run policies once on a load and compare them",
                          description="Run policies once on one load (a trace's total, or the bundled reference\n"
                                      "cases) and compare balancedness, max GPU load and experts moved.",
                          epilog=policies, formatter_class=raw)
    _placement_args(cmp_, reference=True)
    cmp_.add_argument("--redundant", type=_count(0), default=0, metavar="N",
                      help="num_redundant_experts (default %(default)s)")
    cmp_.add_argument("--policies", default=",".join(POLICIES), metavar="A,B,…",
                      help="comma-separated policies from: %(default)s (default: all)")
    cmp_.add_argument("--reference", action="store_true",
                      help="use the bundled reference cases instead of a trace (--ep and the load options unused)")
    _synthetic_args(cmp_)
    cmp_.set_defaults(run=_compare)

    red = sub.add_parser("redundant", help="list num_redundant_experts values valid for an EP size",
                         description="num_redundant_experts values that split (experts + redundant) evenly over EP ranks.")
    red.add_argument("--ep", type=_count(1), required=True, metavar="RANKS", help="EP ranks (GPUs)")
    red.add_argument("--experts", type=_count(1), metavar="N", help="logical experts per layer (or --model)")
    red.add_argument("--model", metavar="NAME", help="bundled model name or config.json (instead of --experts)")
    red.add_argument("--limit", type=_count(1), default=8, metavar="N", help="how many values (default %(default)s)")
    red.set_defaults(run=_redundant)

    log = sub.add_parser("log", help="read vLLM's 'EPLB step' balancedness lines",
                         description="Read the 'EPLB step' lines vLLM logs with log_balancedness on.")
    log.add_argument("path", help="vLLM's log file")
    log.set_defaults(run=_log)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (EpkitError, ValueError) as exc:
        print(f"epkit eplb {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
