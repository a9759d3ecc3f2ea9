"""``epkit profile TRACE_OR_DIR …``: where each engine step's time goes, from torch-profiler chrome traces."""

from __future__ import annotations

import argparse
import json
import sys

EXIT_OK, EXIT_USAGE = 0, 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epkit profile", description="Sum torch-profiler chrome traces of vLLM or `epkit serve` "
        "(--profiler-config, POST /start_profile, /stop_profile) by engine step kind (prefill / mixed / decode, from "
        "vLLM's execute_context_N(T)_generation_M(T) step annotations): wall, GPU busy (union of the kernels the "
        "step launched) and host ms per step, GPU ms per kernel category and the top kernels; the host view: the top "
        "cpu ops by self time, CUDA runtime/driver calls (host sync ms, launches per step) and python/other host "
        "time outside every recorded op. Several traces: side-by-side tables per step kind (docs/analysis.md).")
    p.add_argument("traces", nargs="+", metavar="TRACE_OR_DIR",
                   help="a trace file (*.json, *.json.gz) or a folder: every *.json / *.json.gz in it")
    p.add_argument("--markdown", default=None, metavar="OUT.md", help="also write the tables as markdown")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the summaries as JSON "
                   "('-': JSON on stdout instead of the tables)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="kernels, cpu ops and runtime calls listed "
                   "per step kind (default 10)")
    return p


def _write(path: str, text: str, flag: str) -> str | None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        return f"{flag} {path!r}: cannot write: {exc.strerror or exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from epkit.analysis.step_profile import ProfileError, summarize_all, to_markdown, to_text

    def fail(message: str) -> int:
        print(f"epkit profile: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    if args.top < 1:
        return fail(f"--top {args.top}: must be at least 1")
    skipped: list[str] = []
    try:
        summaries = summarize_all(args.traces, top=args.top, skipped=skipped)
    except ProfileError as exc:
        return fail(str(exc))
    for message in skipped:
        print(f"epkit profile: skipped {message}", file=sys.stderr)
    doc = json.dumps({"traces": summaries}, indent=2) + "\n"
    if args.json == "-":
        sys.stdout.write(doc)
    else:
        sys.stdout.write(to_text(summaries))
        if args.json and (problem := _write(args.json, doc, "--json")):
            return fail(problem)
    if args.markdown and (problem := _write(args.markdown, to_markdown(summaries), "--markdown")):
        return fail(problem)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
