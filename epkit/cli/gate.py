"""``epkit gate BASELINE_DIR NEW_DIR``: fail (exit 1) when NEW regressed against BASELINE past the thresholds."""

from __future__ import annotations

import argparse
import json
import sys

EXIT_PASS, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2


def parser() -> argparse.ArgumentParser:
    from epkit.analysis.gate import DEFAULT_THRESHOLDS, THRESHOLD_FORM

    defaults = ", ".join(f"{m}={v * 100:g}%%" for m, v in DEFAULT_THRESHOLDS.items())  # %% : argparse formats help
    p = argparse.ArgumentParser(
        prog="epkit gate", description="Fail (exit 1) when NEW_DIR regressed against BASELINE_DIR past the "
        "thresholds. Points match by topology id and "
        "workload id; repeats are compared by their medians, and a change past the threshold counts only when the "
        "repeats' ranges do not overlap (docs/gate.md). Exit codes: 0 pass, 1 regression, 2 bad input.")
    p.add_argument("baseline", metavar="BASELINE_DIR", help="the reference sweep's results folder (results/<sweep>)")
    p.add_argument("new", metavar="NEW_DIR", help="the sweep to judge, same spec (results/<sweep>)")
    p.add_argument("--max-regression", action="append", default=None, metavar="METRIC=THRESHOLD",
                   help=f"{THRESHOLD_FORM.replace('%', '%%')}; repeat for several metrics (default: {defaults})")
    p.add_argument("--require-all", action="store_true",
                   help="a point found on one side only fails the gate (default: listed only)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the verdicts as JSON to PATH "
                   "('-': JSON on stdout instead of the table)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from epkit.analysis.gate import GateError, format_table, gate, parse_thresholds

    def fail(message: str) -> int:
        print(f"epkit gate: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    try:
        thresholds = parse_thresholds(args.max_regression)
        result = gate(args.baseline, args.new, thresholds, require_all=args.require_all)
    except GateError as exc:
        return fail(str(exc))
    doc = {"baseline": args.baseline, "new": args.new, **result.to_dict()}
    if args.json == "-":
        print(json.dumps(doc, indent=2))
    else:
        print(format_table(result))
        if args.json:
            try:
                with open(args.json, "w") as f:
                    json.dump(doc, f, indent=2)
                    f.write("\n")
            except OSError as exc:
                return fail(f"--json {args.json!r}: cannot write: {exc.strerror or exc}")
    return EXIT_PASS if result.passed else EXIT_REGRESSION


if __name__ == "__main__":
    sys.exit(main())
