"""The ``epkit`` command: one sub-command per job, each a thin wrapper over the package API.

Whatever a sub-command does with bad input, ``epkit`` never ends in a traceback for it: an
:class:`~epkit.errors.EpkitError` that reaches here is printed as one line and exits 2 (the
status argparse uses for bad flags), a closed stdout (``epkit plan … | head -1``) ends quietly
with 141 like a command killed by SIGPIPE, and Ctrl-C exits 130.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

from epkit.errors import EpkitDeprecationWarning, EpkitError

# sub-command -> module whose ``main(argv) -> int`` runs it. Modules load lazily so that
# `epkit plan` never imports torch or the HTTP stack.
COMMANDS = {
    "plan": ("epkit.cli.plan", "render per-node commands, derived sizes and the memory plan"),
    "serve": ("epkit.engine.cli", "run the built-in engine (takes `vllm serve` flags)"),
    "bench": ("epkit.bench.cli", "drive load at an OpenAI-compatible server"),
    "eplb": ("epkit.eplb.cli", "EPLB policies and the what-if simulator"),
    "sweep": ("epkit.cli.sweep", "run (or --dry-run) a sweep of topologies x workloads; resumes"),
    "doctor": ("epkit.launch.doctor", "preflight checks: GPUs, interfaces, ports, vLLM, EP kernels"),
    "report": ("epkit.cli.report", "one offline HTML page: results table, Pareto frontier, CDFs"),
    "gate": ("epkit.cli.gate", "regression gate: a sweep's results against a baseline's; exit 1 on a regression"),
    "a2a-bench": ("epkit.cli.a2a_bench", "MoE dispatch + combine alone per all2all backend: latency, GB/s, link share"),
    "proxy": ("epkit.proxy.cli", "router of a disaggregated prefill/decode deployment (OpenAI-compatible)"),
    "profile": ("epkit.cli.profile", "where each step's time goes: a torch-profiler trace summed by step kind and kernel kind"),
}
EXIT_USAGE = 2  # bad input: argparse's status, and every epkit sub-command's
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a command killed by SIGPIPE
EXIT_INTERRUPTED = 130


def _usage() -> str:
    lines = ["usage: epkit <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _one_line_warnings(command: str) -> None:
    """Show epkit's deprecation warnings as ``epkit CMD: warning: …`` instead of a file:line block."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, EpkitDeprecationWarning):
            print(f"epkit {command}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _stdout_closed() -> int:
    """The reader of stdout went away: drop what is still buffered, say nothing, exit like SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"epkit: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}\n\n{_usage()}",
              file=sys.stderr)
        return EXIT_USAGE
    _one_line_warnings(name)
    try:
        module = importlib.import_module(COMMANDS[name][0])
        status = int(module.main(rest) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        print(f"epkit {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EpkitError as exc:  # a sub-command let one through: still one line, never a traceback
        print(f"epkit {name}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

