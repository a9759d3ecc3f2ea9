"""The MoE dispatch + combine alone, per all2all backend: ``python -m epkit.engine.a2a_bench``.

Runs the engine's own backends (:data:`epkit.engine.all2all.BACKENDS`, the code ``epkit serve`` runs)
on ``ranks`` torch.distributed processes (gloo on CPU, NCCL on CUDA) with *identity* experts, so a
call moves a model's MoE activations to the ranks that own their experts and back and computes
nothing else: what is timed is dispatch + combine (with the backend's own packing, routing lookups
and weighted sum). Per backend and per token count (tokens per rank) it measures the latency of
one call over ``iters`` calls (the slowest rank's time of each call), counts the bytes every
collective really moved (from the tensors handed to it: :class:`CountingCommunicator`) and checks
that combine ∘ dispatch returned every token unchanged (router weights sum to 1, experts are the
identity). One JSON row per (backend, size) goes to ``--out`` (JSON lines); ``epkit a2a-bench``
(epkit/cli/a2a_bench.py) stores them as results and draws them. Definitions: docs/a2a_bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from epkit.engine.all2all import BACKENDS, BUILTIN, VENDOR, Communicator, make_backend
from epkit.engine.moe import ExpertRanges, StaticExpertMap, accumulation_dtypes
from epkit.errors import EngineError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ROUTINGS = ("uniform", "skewed")
DEVICES = ("cpu", "cuda")
DEFAULT_TOKENS = tuple(2**i for i in range(14))  # 1 … 8192 tokens per rank
DEFAULT_ZIPF = 1.2


@dataclass(frozen=True)
class BenchConfig:
    """One microbenchmark run: a MoE shape, ranks, backends, a token ladder, routing, dtype, repetitions."""

    hidden_size: int
    top_k: int
    num_experts: int
    ranks: int = 2
    backends: tuple[str, ...] = tuple(BUILTIN)
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    routing: str = "uniform"
    zipf_exponent: float = DEFAULT_ZIPF
    dtype: str = "bfloat16"
    iters: int = 50
    warmup: int = 5
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(flag: str, value, allowed: str) -> EngineError:
            return EngineError(f"{flag}={value!r}; allowed: {allowed}")

        for flag, value in (("--hidden-size", self.hidden_size), ("--top-k", self.top_k),
                            ("--num-experts", self.num_experts), ("--ranks", self.ranks), ("--iters", self.iters)):
            if not isinstance(value, int) or value < 1:
                raise bad(flag, value, "an integer >= 1")
        if self.warmup < 0:
            raise bad("--warmup", self.warmup, "an integer >= 0")
        if self.top_k > self.num_experts:
            raise bad("--top-k", self.top_k, f"1..{self.num_experts} (the number of experts)")
        if self.num_experts < self.ranks:
            raise bad("--ranks", self.ranks, f"1..{self.num_experts}: every rank needs an expert")
        if not self.tokens or any(not isinstance(t, int) or t < 1 for t in self.tokens):
            raise bad("--tokens", ",".join(map(str, self.tokens)), "a comma-separated list of integers >= 1")
        if self.routing not in ROUTINGS:
            raise bad("--routing", self.routing, ", ".join(ROUTINGS))
        if self.zipf_exponent < 0:
            raise bad("--zipf-exponent", self.zipf_exponent, "a number >= 0")
        if self.dtype not in DTYPES:
            fp8 = ("; fp8 dispatch is a vendor-kernel feature (DeepEP low-latency, pplx): the built-in backends "
                   "move activations in the model's dtype") if "float8" in self.dtype or "fp8" in self.dtype else ""
            raise EngineError(f"--dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}{fp8}")
        if self.device not in DEVICES:
            raise bad("--device", self.device, ", ".join(DEVICES))
        if self.device == "cuda":
            gpus = torch.cuda.device_count()
            if self.ranks > gpus:
                raise bad("--ranks", self.ranks, f"1..{gpus}: one GPU per rank (this machine shows {gpus})")
        if not self.backends:
            raise bad("--backend", "", ", ".join(BACKENDS))
        for name in self.backends:
            if name not in BACKENDS:
                raise bad("--backend", name, ", ".join(BACKENDS))


def check_backends(names) -> None:
    """Refuse a vendor backend up front, naming the package it needs: nothing else is timed under its name."""
    for name in names:
        if name not in VENDOR:
            continue
        v = VENDOR[name]
        import importlib.util

        if importlib.util.find_spec(v.module) is None:
            raise EngineError(f"--backend {name} needs the {v.package} package (Python module {v.module!r}), which is "
                              f"not importable here; install it with {v.install}; the built-in backends run "
                              f"everywhere: {', '.join(BUILTIN)}")
        raise EngineError(f"--backend {name}: {v.package} is importable, but epkit's microbenchmark has no "
                          f"integration with it yet (it never times another algorithm under this name); "
                          f"the built-in backends: {', '.join(BUILTIN)}")


class IdentityExperts:
    """Experts that return their input: the backends' expert interface (:class:`epkit.engine.moe.LocalExperts`)
    without any compute, so a backend call is dispatch + combine alone."""

    def __init__(self, placement: ExpertRanges, device: torch.device):
        self.map = StaticExpertMap(placement, device)
        self.num_local = len(placement.local_experts)
        self.load = None

    def __call__(self, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        return x

    def supports_sentinel(self, x: torch.Tensor) -> bool:
        return x.device.type == "cuda"  # as the real experts: the sync-free path on GPUs, the exact one on CPU

    def with_sentinel(self, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        return x

    def partial(self, x, expert_idx, pair_weights, k: int, local_share: float = 1.0) -> torch.Tensor:
        """Rows of ``x`` times the sum of this rank's router weights of each row (the fused GPU path's result)."""
        acc = accumulation_dtypes(x.dtype)[1]
        mine = (expert_idx < self.num_local).view(-1, k)
        w = torch.where(mine, pair_weights.view(-1, k), torch.zeros((), dtype=pair_weights.dtype, device=x.device))
        return x.to(acc) * w.to(acc).sum(1, keepdim=True)


class CountingCommunicator(Communicator):
    """A :class:`Communicator` that records, per collective, the bytes of the tensors it was handed.

    ``alg`` is the collective's size as NCCL's tests define it (all-gather: the gathered tensor; reduce-scatter,
    all-reduce, broadcast, all-to-all: the input); ``bus`` the bytes that cross this rank's link (all-gather /
    reduce-scatter: ``(N-1)/N`` of that size, all-reduce ``2(N-1)/N``, broadcast all of it, all-to-all the rows
    sent to other ranks)."""

    def __init__(self, rank: int, world_size: int, group=None, cpu_group=None):
        super().__init__(rank, world_size, group, cpu_group)
        self.calls: list[tuple[str, int, float]] = []

    def _record(self, op: str, alg: int, bus: float) -> None:
        self.calls.append((op, int(alg), float(bus)))

    def all_gather(self, t):
        out = super().all_gather(t)
        self._record("all_gather", out.nbytes, out.nbytes * (self.world_size - 1) / self.world_size)
        return out

    def reduce_scatter(self, t):
        self._record("reduce_scatter", t.nbytes, t.nbytes * (self.world_size - 1) / self.world_size)
        return super().reduce_scatter(t)

    def all_reduce(self, t):
        self._record("all_reduce", t.nbytes, 2 * t.nbytes * (self.world_size - 1) / self.world_size)
        return super().all_reduce(t)

    def broadcast(self, t, src: int):
        self._record("broadcast", t.nbytes, t.nbytes)
        return super().broadcast(t, src)

    def all_to_all(self, out, t, out_splits, in_splits):
        row = t.nbytes // max(1, t.shape[0])
        off_rank = sum(n for j, n in enumerate(in_splits) if j != self.rank)
        self._record("all_to_all", t.nbytes, off_rank * row)
        return super().all_to_all(out, t, out_splits, in_splits)


def make_inputs(cfg: BenchConfig, rank: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's tokens ``[tokens, hidden]`` (in ``cfg.dtype``, on the CPU) and their routing: top-k distinct
    experts per token (uniform, or Zipf over expert ids with ``cfg.zipf_exponent``: expert ``e`` drawn with
    weight ``(e + 1) ** -s``) and float32 router weights that sum to 1. A function of (seed, rank, tokens)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 65_537 + tokens)
    x = torch.randn(tokens, cfg.hidden_size, generator=g).to(DTYPES[cfg.dtype])
    if cfg.routing == "uniform":
        ids = torch.rand(tokens, cfg.num_experts, generator=g).argsort(dim=1)[:, : cfg.top_k]
    else:
        p = torch.arange(1, cfg.num_experts + 1, dtype=torch.float64) ** -cfg.zipf_exponent
        ids = torch.multinomial(p.expand(tokens, -1), cfg.top_k, replacement=False, generator=g)
    w = torch.rand(tokens, cfg.top_k, generator=g, dtype=torch.float64) + 0.1
    return x, ids, (w / w.sum(1, keepdim=True)).to(torch.float32)


def packed_row_bytes(hidden: int, dtype_bytes: int, top_k: int) -> int:
    """Bytes of one row of the gather-based backends' packed buffer: the token (padded to 8) and its routing."""
    return -(-hidden * dtype_bytes // 8) * 8 + 8 * top_k


def expected_bytes(backend: str, rank: int, tokens: int, hidden: int, top_k: int, dtype_bytes: int,
                   acc_bytes: int, sends: list[list[int]]) -> tuple[int, float]:
    """(alg bytes, bus bytes) that one dispatch + combine of ``backend`` implies for ``rank`` when every rank
    has ``tokens`` tokens; ``sends[i][j]`` = (token, expert) pairs rank ``i`` routes to rank ``j``'s experts,
    ``acc_bytes`` the element size of the partial sums (float64 on CPU). docs/a2a_bench.md derives each term."""
    n = len(sends)
    row = packed_row_bytes(hidden, dtype_bytes, top_k)
    partial = n * tokens * hidden * acc_bytes
    if backend == "allgather_reducescatter":
        return n * tokens * row + partial, (n - 1) * tokens * row + (n - 1) / n * partial
    if backend == "naive":
        return n * tokens * row + partial, n * tokens * row + 2 * (n - 1) / n * partial
    if backend == "all_to_all":
        sent_off = sum(sends[rank][j] for j in range(n) if j != rank)
        recv_all = sum(sends[i][rank] for i in range(n))
        recv_off = recv_all - sends[rank][rank]
        alg = 8 * n + tokens * top_k * (hidden * dtype_bytes + 8) + recv_all * hidden * dtype_bytes
        bus = 8 * (n - 1) + sent_off * (hidden * dtype_bytes + 8) + recv_off * hidden * dtype_bytes
        return alg, bus
    raise ValueError(f"backend={backend!r}; allowed: {', '.join(BUILTIN)}")


def _gather_floats(values: list[float], comm: Communicator) -> list[list[float]]:
    """Every rank's list of floats (same length everywhere), over the CPU group."""
    import torch.distributed as dist

    mine = torch.tensor(values, dtype=torch.float64)
    if comm.world_size == 1:
        return [values]
    parts = [torch.empty_like(mine) for _ in range(comm.world_size)]
    dist.all_gather(parts, mine, group=comm.cpu_group)
    return [p.tolist() for p in parts]


def _time_calls(backend, args, cfg: BenchConfig, comm: Communicator) -> list[float]:
    """Seconds of each of ``cfg.iters`` calls on this rank (after ``cfg.warmup``), every call started together."""
    import torch.distributed as dist

    cuda = cfg.device == "cuda"
    times = []
    for i in range(cfg.warmup + cfg.iters):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier(group=comm.cpu_group)
        t0 = time.perf_counter()
        backend(*args)
        if cuda:
            torch.cuda.synchronize()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    return times


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an ascending list."""
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _measure(cfg: BenchConfig, name: str, tokens: int, comm: Communicator, device: torch.device) -> dict | None:
    """One (backend, size) point on every rank; the row (on rank 0, None elsewhere)."""
    placement = ExpertRanges(cfg.num_experts, comm.world_size, comm.rank)
    experts = IdentityExperts(placement, device)
    x, ids, w = make_inputs(cfg, comm.rank, tokens)
    x, ids, w = x.to(device), ids.to(device), w.to(device)
    counts = [tokens] * comm.world_size
    owner = placement.owner_table(torch.device("cpu"))[ids.cpu()].reshape(-1)
    sends = torch.bincount(owner, minlength=comm.world_size).tolist()

    counting = CountingCommunicator(comm.rank, comm.world_size, comm.group, comm.cpu_group)
    out = make_backend(name, counting, device)(x, ids, w, experts, counts)
    err = float((out.float() - x.float()).abs().max()) if tokens else 0.0
    tol = 2.0**-7 if cfg.dtype in ("bfloat16", "float16") else 1e-5
    ok = bool(torch.allclose(out.float(), x.float(), rtol=tol, atol=tol))
    alg, bus = sum(c[1] for c in counting.calls), sum(c[2] for c in counting.calls)
    acc_bytes = next((c[1] // (comm.world_size * tokens * cfg.hidden_size) for c in counting.calls
                      if c[0] in ("reduce_scatter", "all_reduce")), 0)

    times = _time_calls(make_backend(name, comm, device), (x, ids, w, experts, counts), cfg, comm)
    table = _gather_floats([alg, bus, float(ok), err] + sends + times, comm)
    if comm.rank:
        return None
    n = comm.world_size
    per_rank = [[r[0] for r in table], [r[1] for r in table]]
    slowest = [max(r[4 + n + i] for r in table) for i in range(cfg.iters)]  # a call ends when its last rank does
    s = sorted(slowest)
    median = _percentile(s, 50)
    send_matrix = [[int(v) for v in r[4 : 4 + n]] for r in table]
    recv = [sum(send_matrix[i][j] for i in range(n)) for j in range(n)]
    return {
        "backend": name, "ranks": n, "tokens_per_rank": tokens, "hidden_size": cfg.hidden_size, "top_k": cfg.top_k,
        "num_experts": cfg.num_experts, "routing": cfg.routing,
        "zipf_exponent": cfg.zipf_exponent if cfg.routing == "skewed" else None, "dtype": cfg.dtype,
        "device": cfg.device, "iters": cfg.iters, "warmup": cfg.warmup,
        "median_latency_us": median * 1e6, "p99_latency_us": _percentile(s, 99) * 1e6,
        "mean_latency_us": sum(s) / len(s) * 1e6, "min_latency_us": s[0] * 1e6, "max_latency_us": s[-1] * 1e6,
        "alg_bytes": max(per_rank[0]), "bus_bytes": max(per_rank[1]),
        "algbw_gbs": max(per_rank[0]) / median / 1e9, "busbw_gbs": max(per_rank[1]) / median / 1e9,
        "partial_bytes_per_element": acc_bytes,
        "identity_ok": all(r[2] == 1.0 for r in table), "identity_max_abs_err": max(r[3] for r in table),
        "expert_load_imbalance": max(recv) / (sum(recv) / n),
        "alg_bytes_per_rank": per_rank[0], "bus_bytes_per_rank": per_rank[1], "send_pairs": send_matrix,
        "latencies_us": [t * 1e6 for t in slowest],
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"cpu: {model}" if model else "cpu"


def _worker(rank: int, cfg: BenchConfig, init_file: str, out_path: str) -> None:
    import torch.distributed as dist

    if cfg.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=cfg.ranks,
                                device_id=device)
        cpu_group = dist.new_group(backend="gloo")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=cfg.ranks)
        cpu_group = dist.group.WORLD
    comm = Communicator(rank, cfg.ranks, dist.group.WORLD, cpu_group)
    extra = {"device_name": _device_name(device), "torch_version": torch.__version__,
             "dist_backend": dist.get_backend()}
    try:
        with open(out_path, "w") if rank == 0 else open(os.devnull, "w") as out:
            for name in cfg.backends:
                for tokens in cfg.tokens:
                    row = _measure(cfg, name, tokens, comm, device)
                    if row is not None:
                        out.write(json.dumps({**row, **extra}) + "\n")
                        out.flush()
                        print(f"a2a-bench: {name} ranks={cfg.ranks} tokens={tokens}: "
                              f"median {row['median_latency_us']:.1f} µs, bus {row['busbw_gbs']:.3f} GB/s",
                              file=sys.stderr, flush=True)
    finally:
        dist.destroy_process_group()


def run(cfg: BenchConfig, out_path: str | None = None) -> list[dict]:
    """Run ``cfg`` on ``cfg.ranks`` spawned processes; the rows, one per (backend, tokens), in that order.
    Rows are also written as JSON lines to ``out_path`` as they come (when given)."""
    import torch.multiprocessing as mp

    check_backends(cfg.backends)
    if cfg.device == "cuda" and torch.cuda.device_count() < 1:
        raise EngineError("--device cuda: no CUDA device is visible here; use --device cpu")
    with tempfile.TemporaryDirectory(prefix="epkit-a2a-") as tmp:
        rows_path = out_path or os.path.join(tmp, "rows.jsonl")
        # forkserver: torch and the engine's modules are imported once, in the server, not once per rank (4 ranks
        # on 2 busy cores: 0.3 s instead of 25 s); this module itself is not preloaded, so `python -m` stays quiet
        import multiprocessing

        preload = ["torch", "epkit.engine.all2all", "epkit.engine.moe"]
        multiprocessing.get_context("forkserver").set_forkserver_preload(preload)
        mp.start_processes(_worker, args=(cfg, os.path.join(tmp, "rendezvous"), rows_path), nprocs=cfg.ranks,
                           join=True, start_method="forkserver")
        with open(rows_path) as f:
            return [json.loads(line) for line in f if line.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m epkit.engine.a2a_bench", description=__doc__.split("\n")[0])
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--num-experts", type=int, required=True)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backend", nargs="+", default=list(BUILTIN))
    p.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    p.add_argument("--routing", default="uniform")
    p.add_argument("--zipf-exponent", type=float, default=DEFAULT_ZIPF)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON-lines file the rows are written to")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    except ValueError:
        print(f"epkit a2a-bench: error: --tokens={args.tokens!r}; allowed: a comma-separated list of integers >= 1",
              file=sys.stderr)
        return 2
    try:
        cfg = BenchConfig(args.hidden_size, args.top_k, args.num_experts, args.ranks, tuple(args.backend), tokens,
                          args.routing, args.zipf_exponent, args.dtype, args.iters, args.warmup, args.device,
                          args.seed)
        run(cfg, args.out)
    except EngineError as exc:
        print(f"epkit a2a-bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # run as `python -m`: the ranks pickle this module's names, so use the imported one
    from epkit.engine.a2a_bench import main as _main

    sys.exit(_main())
