"""``epkit report RESULTS… -o report.html``: the results' table and figures as one offline HTML page."""

from __future__ import annotations

import argparse
import os
import sys

from epkit.errors import EpkitError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epkit report", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="result files or folders (searched recursively), e.g. results/quickstart")
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write (default: report.html)")
    p.add_argument("--title", default=None, help="page title (default: from the results)")
    p.add_argument("--color", default=None, help="column that colours the Pareto figure (default: all2all_backend "
                                                 "when it varies, else topology)")
    p.add_argument("--x", default="interactivity_pareto_tok_s", help="Pareto x column (default: %(default)s)")
    p.add_argument("--y", default="output_tok_s_per_gpu", help="Pareto y column (default: %(default)s)")
    p.add_argument("--slo", default=None, metavar="KEY=MS,…",
                   help="latency limits of the SLA attainment table (vllm bench serve --goodput's keys: ttft, tpot, "
                        "e2el; ms), e.g. ttft=500,tpot=50; the table is on the page for P/D results (default limits "
                        "ttft=2000,tpot=200) and whenever --slo is given")
    p.add_argument("--plotly-js", default=None, metavar="FILE",
                   help="keep plotly.js in FILE (written if missing or different) and load it from the page by a "
                        "relative path, instead of inlining 4.6 MB in every page: for reports kept side by side, e.g. "
                        "results/plotly.min.js (default: inlined; the page works alone)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from epkit.analysis.report import write
    from epkit.analysis.sla import parse_slos

    def fail(message: str) -> int:
        print(f"epkit report: error: {message}", file=sys.stderr)
        return 2

    if os.path.isdir(args.output):
        return fail(f"-o {args.output!r} is a folder; give the HTML file to write, e.g. {args.output}/report.html")
    try:
        slos = parse_slos(args.slo) if args.slo is not None else None
    except ValueError as exc:
        return fail(f"--slo: {exc}")
    try:
        path = write(args.results, args.output, plotly_js=args.plotly_js, title=args.title, color=args.color, x=args.x,
                     y=args.y, slos_ms=slos)
    except KeyError as exc:  # a column the results do not have
        said = exc.args[0] if exc.args else exc
        if not isinstance(said, str):  # pandas names the missing columns as a list
            flags = [f"--{name} {value!r}" for name, value in (("x", args.x), ("y", args.y), ("color", args.color))
                     if value is not None and value in str(said)]
            said = f"{' and '.join(flags) or said}: no such column in the results"
        return fail(said)
    except FileNotFoundError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot write {args.output!r}: {exc.strerror or exc}")
    except EpkitError as exc:
        return fail(str(exc))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
