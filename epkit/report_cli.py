"""``epkit report RESULTS… -o report.html``: the results' table and figures as one offline HTML page."""

from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epkit report", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="result files or folders (searched recursively), e.g. results/quickstart")
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write (default: report.html)")
    p.add_argument("--title", default=None)
    p.add_argument("--color", default=None, help="column that colours the Pareto figure (default: all2all_backend "
                                                 "when it varies, else topology)")
    p.add_argument("--x", default="interactivity_pareto_tok_s", help="Pareto x column (default: %(default)s)")
    p.add_argument("--y", default="output_tok_s_per_gpu", help="Pareto y column (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from epkit.report import write

    try:
        path = write(args.results, args.output, title=args.title, color=args.color, x=args.x, y=args.y)
    except (FileNotFoundError, KeyError) as exc:
        print(f"epkit report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
