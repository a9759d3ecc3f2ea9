"""``epkit a2a-bench``: MoE dispatch + combine alone, per all2all backend, over a token ladder, on N ranks.

The measurement is the built-in engine's (``python -m epkit.engine.a2a_bench``, run as a command: the rest of
epkit reaches the engine only through its command line); this command resolves the model's shape, runs it,
stores every row as a point of the results store under ``--results`` (:func:`point_doc`: the format
:mod:`epkit.analysis.a2a` reads), prints a table and, with ``--report``, writes the offline HTML page.
Storing needs neither pandas nor plotly (a GPU box may lack them); only ``--report`` does.
Definitions of every number: docs/a2a_bench.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from epkit.errors import EpkitError
from epkit.topology.backends import BUILTIN_BACKENDS, VENDOR_PACKAGES

DEFAULT_TOKENS = ",".join(str(2**i) for i in range(14))  # 1 … 8192 per rank
DEFAULT_MODEL = "Qwen/Qwen3-30B-A3B"
BENCHMARK = "a2a"  # the ``benchmark`` key of every point written here (epkit.analysis.a2a selects rows by it)
# Physical link of one GPU, GB/s per direction, by a word of the device's name (NVLink 4 on H100 / H200:
# 18 links × 25 GB/s). The CPU has no such number: a fraction is only given with --link-gbps.
LINK_GBPS = {"H100": 450.0, "H200": 450.0}
METRICS = ["median_latency_us", "p99_latency_us", "mean_latency_us", "min_latency_us", "max_latency_us",
           "alg_bytes", "bus_bytes", "algbw_gbs", "busbw_gbs", "identity_ok", "identity_max_abs_err",
           "expert_load_imbalance"]


def link_gbps_for(device_name: str | None) -> float | None:
    """The physical link bandwidth (GB/s per direction) of a device by its name; None when unknown (CPUs)."""
    for word, gbps in LINK_GBPS.items():
        if device_name and re.search(rf"\b{word}\b", device_name):
            return gbps
    return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text).split("/")[-1]).strip("-") or "model"


def point_ids(row: dict, model: str) -> tuple[str, str]:
    """(topology_id, workload_id) of a row: one folder per curve, one file per token count."""
    shape = f"h{row['hidden_size']}-k{row['top_k']}-e{row['num_experts']}"  # overrides of the model's shape
    routing = row["routing"] + (f"{row['zipf_exponent']:g}" if row.get("zipf_exponent") is not None else "")
    topology = (f"{slug(model)}-{shape}__{row['backend']}__ep{row['ranks']}__{routing}__{row['dtype']}__"
                f"{row['device']}")
    return topology, f"tokens{int(row['tokens_per_rank']):05d}"


def point_doc(row: dict, *, sweep: str, model: str, link_gbps: float | None, command: list[str],
              git_commit: str | None, started_at: str) -> dict:
    """The stored document of one microbenchmark row (see the module docstring)."""
    topology_id, workload_id = point_ids(row, model)
    status, failure = "ok", None
    if not row["identity_ok"]:
        status = "failed"
        failure = {"kind": "identity", "message": f"combine ∘ dispatch changed the tokens (max abs error "
                                                  f"{row['identity_max_abs_err']:.3g}): the backend is wrong here"}
    metrics = {k: row[k] for k in METRICS if k in row}
    metrics["link_gbps"] = link_gbps
    metrics["link_fraction"] = row["busbw_gbs"] / link_gbps if link_gbps else None
    topology = {"model": model, "all2all_backend": row["backend"], "ep_size": row["ranks"],
                **{k: row[k] for k in ("hidden_size", "top_k", "num_experts", "routing", "zipf_exponent", "dtype",
                                       "device")}}
    detail = ("alg_bytes_per_rank", "bus_bytes_per_rank", "send_pairs", "latencies_us", "partial_bytes_per_element")
    return {
        "date": _dt.datetime.now().strftime("%Y%m%d-%H%M%S"), "benchmark": BENCHMARK,
        "tokens_per_rank": row["tokens_per_rank"], "iters": row["iters"], "warmup": row["warmup"], **metrics,
        "epkit": {
            "point": {"sweep": sweep, "topology_id": topology_id, "workload_id": workload_id, "repeat": 0,
                      "status": status, "failure": failure, "topology": topology, "engine": "epkit a2a-bench",
                      "workload": {"tokens_per_rank": row["tokens_per_rank"], "iters": row["iters"],
                                   "warmup": row["warmup"]},
                      "hardware": {"device_name": row.get("device_name"), "torch": row.get("torch_version"),
                                   "dist_backend": row.get("dist_backend")},
                      "git_commit": git_commit, "started_at": started_at, "command": command},
            "a2a": {k: row[k] for k in detail if k in row},
        },
    }


def git_commit() -> str | None:
    """The checkout's commit (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[2]), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parser() -> argparse.ArgumentParser:
    backends = [*BUILTIN_BACKENDS, *VENDOR_PACKAGES]
    p = argparse.ArgumentParser(prog="epkit a2a-bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="bundled model name or config.json path: hidden size, top-k and experts (default: %(default)s)")
    p.add_argument("--hidden-size", type=int, default=None, help="override the model's hidden size")
    p.add_argument("--top-k", type=int, default=None, help="override the model's experts per token")
    p.add_argument("--num-experts", type=int, default=None, help="override the model's routed experts")
    p.add_argument("--ranks", type=int, default=2, help="EP ranks (processes; one GPU each on CUDA) (default: 2)")
    p.add_argument("--backend", nargs="+", default=list(BUILTIN_BACKENDS), metavar="B",
                   help=f"backends to time (default: the built-in ones); known: {', '.join(backends)}")
    p.add_argument("--tokens", default=DEFAULT_TOKENS, help="tokens per rank, comma-separated (default: 1,2,4,…,8192)")
    p.add_argument("--routing", default="uniform", help="uniform | skewed (Zipf over expert ids) (default: uniform)")
    p.add_argument("--zipf-exponent", type=float, default=1.2, help="skewed routing's exponent s (default: 1.2)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32 (default: bfloat16)")
    p.add_argument("--iters", type=int, default=50, help="timed calls per size (default: 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per size first (default: 5)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) | cuda (NCCL) (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--link-gbps", type=float, default=None,
                   help="physical link, GB/s per direction, for the fraction of it (default: 450 on H100/H200; "
                        "none on CPU)")
    p.add_argument("--results", default="results/a2a", help="folder the points go to (default: %(default)s)")
    p.add_argument("--report", default=None, metavar="OUT.html", help="also write the offline HTML report there")
    return p


def _shape(args) -> tuple[str, int, int, int]:
    from epkit.topology.models import ModelSpec

    spec = ModelSpec.load(args.model)
    return (spec.name, args.hidden_size or spec.hidden_size, args.top_k or spec.top_k,
            args.num_experts or spec.num_experts)


def _engine_argv(args, shape: tuple[str, int, int, int], out: Path) -> list[str]:
    _, hidden, top_k, experts = shape
    return [sys.executable, "-m", "epkit.engine.a2a_bench", "--hidden-size", str(hidden), "--top-k", str(top_k),
            "--num-experts", str(experts), "--ranks", str(args.ranks), "--backend", *args.backend,
            "--tokens", args.tokens, "--routing", args.routing, "--zipf-exponent", str(args.zipf_exponent),
            "--dtype", args.dtype, "--iters", str(args.iters), "--warmup", str(args.warmup),
            "--device", args.device, "--seed", str(args.seed), "--out", str(out)]


def _store(rows: list[dict], args, model: str, started_at: str, argv: list[str]) -> list[Path]:
    from epkit.sweep.store import ResultStore

    folder = Path(args.results)
    store = ResultStore(folder.parent, folder.name)
    commit = git_commit()
    paths = []
    for row in rows:
        link = args.link_gbps if args.link_gbps is not None else link_gbps_for(row.get("device_name"))
        doc = point_doc(row, sweep=folder.name, model=model, link_gbps=link, command=["epkit", "a2a-bench", *argv],
                            git_commit=commit, started_at=started_at)
        topology_id, workload_id = point_ids(row, model)
        paths.append(store.write_point(store.point_path(topology_id, workload_id), doc))
    return paths


def _print_table(paths: list[Path]) -> None:
    print(f"{'backend':<24} {'ranks':>5} {'tokens':>6} {'median µs':>10} {'p99 µs':>10} {'alg GB/s':>9} "
          f"{'bus GB/s':>9} {'link':>6}")
    for path in paths:
        d = json.loads(path.read_text())
        t = d["epkit"]["point"]["topology"]
        link = f"{d['link_fraction']:.1%}" if d.get("link_fraction") is not None else "-"
        print(f"{t['all2all_backend']:<24} {t['ep_size']:>5} {d['tokens_per_rank']:>6} {d['median_latency_us']:>10.1f} "
              f"{d['p99_latency_us']:>10.1f} {d['algbw_gbs']:>9.4g} {d['busbw_gbs']:>9.4g} {link:>6}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)

    def fail(message: str) -> int:
        print(f"epkit a2a-bench: error: {message}", file=sys.stderr)
        return 2

    if args.link_gbps is not None and not args.link_gbps > 0:
        return fail(f"--link-gbps={args.link_gbps}; allowed: a number > 0 (GB/s per direction)")
    if Path(args.results).is_file():
        return fail(f"--results={args.results!r} is a file; allowed: a folder (made if missing)")
    try:
        shape = _shape(args)
    except EpkitError as exc:
        return fail(f"--model={args.model!r}: {exc}")
    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
    with tempfile.TemporaryDirectory(prefix="epkit-a2a-") as tmp:
        out = Path(tmp) / "rows.jsonl"
        # the engine checks every other flag (naming it) and refuses vendor backends before any rank starts
        status = subprocess.run(_engine_argv(args, shape, out)).returncode
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    if status != 0:
        if rows:  # what finished before the failure is kept
            _store(rows, args, shape[0], started_at, argv)
        return status
    paths = _store(rows, args, shape[0], started_at, argv)
    _print_table(paths)
    print(f"wrote {len(paths)} point(s) under {args.results}")
    if args.report:
        from epkit.analysis import a2a

        print(f"wrote {a2a.write(args.results, args.report)}")
    bad = [r for r in rows if not r["identity_ok"]]
    if bad:
        print(f"epkit a2a-bench: {len(bad)} point(s) failed the combine ∘ dispatch = identity check (stored as "
              f"failed): {', '.join(sorted({r['backend'] for r in bad}))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
