"""``epkit sweep SPEC.yaml``: plan (``--dry-run``) or run a sweep, resuming from its results folder."""

from __future__ import annotations

import argparse
import json
import sys

from epkit.errors import EpkitError


def format_plan(plan: dict) -> str:
    lines = [f"sweep {plan['sweep']} ({plan['executor']}): {plan['deployments']} deployments, {plan['points']} points "
             f"({plan['points_pending']} to run, {plan['deployments_to_start']} deployments to start), "
             f"estimated {plan['gpu_hours']:.2f} GPU-hours"]
    for t in plan["topologies"]:
        mem = t["memory"]
        verdict = "memory: n/a (no plan.gpus)" if mem is None else \
            f"memory on {mem['gpu']}: {'fits' if mem['fits'] else 'DOES NOT FIT'} — {mem['reason']}"
        lines += ["", f"== {t['id']}  ({t['nodes']} node(s), {t['gpus']} GPUs; {t['pending']}/{t['points']} points "
                      f"to run)", f"   {verdict}"]
        lines += [f"   warning: {w}" for w in t["warnings"]]
        lines += [f"   vllm: {note}" for note in t.get("engine", [])]
        for n, cmd in enumerate(t["commands"]):
            if not cmd.startswith("# "):  # a split point's commands name their instance and node themselves
                lines.append(f"   # node {n}" + (" (primary)" if n == 0 else " (headless)"))
            lines += ["   " + ln for ln in cmd.splitlines()]
    lines += ["", "workloads:"] + [f"   {w['id']}: " + ", ".join(f"{k}={v}" for k, v in w.items() if k != "id")
                                   for w in plan["workloads"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="epkit sweep", description="Run a sweep spec: one deployment per topology, "
                                 "every workload against it; results in <results>/<name>/. Re-running resumes.")
    ap.add_argument("spec", help="sweep YAML")
    ap.add_argument("--dry-run", action="store_true", help="print commands, memory verdicts, counts, GPU-hours; "
                    "start nothing")
    ap.add_argument("--results", default=None, help="results root (default: the spec's results_dir or ./results)")
    ap.add_argument("--retry-failed", action="store_true", help="run failed points again (finished ones never)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these topology ids")
    ap.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    ap.add_argument("--vllm-bin", default=None, metavar="COMMAND",
                    help="the command that runs vLLM's CLI for engine: vllm (e.g. /opt/vllm/bin/vllm or "
                         "'python3 -m vllm.entrypoints.cli.main'); overrides the spec's vllm_bin: and $EPKIT_VLLM_BIN "
                         "(default: vllm on PATH)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from epkit.sweep.spec import load_sweep, plan_sweep

    try:
        spec = load_sweep(args.spec, vllm_bin=args.vllm_bin, only=args.only)
    except EpkitError as exc:
        print(f"epkit sweep: {exc}", file=sys.stderr)
        return 2
    from epkit.sweep.store import ResultStore

    store = ResultStore(args.results or spec.results_dir, spec.name)
    done = {}
    for tp in spec.topologies:
        for w in spec.workloads:
            for r in range(w.repeats):
                st = store.status(store.point_path(tp.id, w.id, r, w.repeats))
                if st == "ok" or (st == "failed" and not args.retry_failed):
                    done[(tp.id, w.id, r)] = "ok"
    plan = plan_sweep(spec, done)
    if args.dry_run:
        print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
        return 0
    print(format_plan(plan).split("\n", 1)[0], file=sys.stderr)
    from epkit.sweep.runner import format_failure, run_sweep

    try:
        summary = run_sweep(spec, args.results, args.retry_failed, progress=not args.no_progress, only=args.only)
    except EpkitError as exc:  # another driver runs this sweep
        print(f"epkit sweep: {exc}", file=sys.stderr)
        return 2
    print(f"sweep {spec.name}: {summary['points_ok']} ok, {summary['points_failed']} failed, "
          f"{summary['points_skipped']} already done; {summary['deployments_started']} deployments started; "
          f"{summary['wall_s']:.1f} s; results in {store.dir}")
    for entry in summary["failures"]:  # kind, message and where the log is, for each failure
        print(format_failure(entry))
    return 0 if summary["points_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
