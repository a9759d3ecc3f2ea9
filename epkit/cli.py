"""The ``epkit`` command: one sub-command per job, each a thin wrapper over the package API."""

from __future__ import annotations

import importlib
import sys

# sub-command -> module whose ``main(argv) -> int`` runs it. Modules load lazily so that
# `epkit plan` never imports torch or the HTTP stack.
COMMANDS = {
    "plan": ("epkit.plan_cli", "render per-node commands, derived sizes and the memory plan"),
    "serve": ("epkit.engine.cli", "run the built-in engine (takes `vllm serve` flags)"),
    "bench": ("epkit.bench.cli", "drive load at an OpenAI-compatible server"),
    "eplb": ("epkit.eplb.cli", "EPLB policies and the what-if simulator"),
    "sweep": ("epkit.sweep_cli", "run (or --dry-run) a sweep of topologies x workloads; resumes"),
    "doctor": ("epkit.launch.doctor", "preflight checks: GPUs, interfaces, ports, vLLM, EP kernels"),
    "report": ("epkit.report_cli", "one offline HTML page: results table, Pareto frontier, CDFs"),
}


def _usage() -> str:
    lines = ["usage: epkit <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"epkit: unknown command {name!r}; choose from {', '.join(COMMANDS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
