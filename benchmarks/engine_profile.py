"""Where one decode step of the built-in engine goes (issue 8): timing, host syncs, torch-profiler breakdown.

Starts ``--dp`` processes (one per GPU, NCCL + a gloo control group, like ``epkit serve``), builds
each rank's ``ModelRunner`` with dummy weights and runs steady decode steps: ``--batch`` sequences
per rank, each with ``--ctx`` tokens of context, one new token each (the context is not advanced,
so every step has the same shapes). For each batch size and each variant it reports:

* wall ms per step (``ModelRunner.execute``: meta build, forward, logits, greedy sampling);
* host syncs per step (``torch.cuda.set_sync_debug_mode``), GPU kernel time per step;
* a torch-profiler breakdown by region (rank 0): host (CPU) ms and GPU kernel ms of attention,
  expert GEMMs, all-gather / reduce-scatter, routing, combine, logits + sampling, meta build;
  GPU kernels also by name category.

Variants: ``after`` = the engine as it is, ``graph`` = the engine's forward captured once in a CUDA graph
and replayed (the prototype that preceded the engine's graph steps), ``engine-graph`` = ``ModelRunner.execute``
with every rank's step shape, i.e. the engine's own CUDA graphs (``StepGraphs`` in ``epkit/engine/graphs.py``:
padded to a capture size and a context bucket, captured on first use, replayed after); it also reports how many greedy tokens
equal the eager step's; ``engine-graph-torch`` = the same with the Triton kernels off (PyTorch
attention gather, RMSNorm and RoPE chains: ``EPKIT_DECODE_ATTENTION=torch EPKIT_FUSED_KERNELS=torch``), so
one call measures what the kernels are worth. ``after`` runs with the kernels as the engine picks
them (``--eager-torch`` turns them off there too). Steps with a prompt in them: ``mixed`` = the
``--batch`` decodes plus one new ``--prefill-len``-token prompt per rank, eager (what every arrival
cost before mixed graph steps), ``mixed-graph`` = the same step through the engine's graphs (every
prompt token a row of the graph), ``prefill`` = ``--prefill-seqs`` whole prompts of ``--ctx`` tokens
per rank in one eager step (a rate-inf burst: 16 x 512 = 8,192 tokens, vLLM's token budget per step).
Any variant with ``-gmm`` appended runs with ``EPKIT_MOE_GEMM=torch`` (``torch._grouped_mm`` as the expert
GEMMs instead of the engine's choice, usually the Triton expert GEMMs at decode sizes), an A/B of that kernel;
``-sdpa`` appended runs with ``EPKIT_PREFILL_ATTENTION=torch`` (PyTorch SDPA for multi-token sequences instead
of the Triton paged prefill kernel), ``-triton`` with ``EPKIT_PREFILL_ATTENTION=triton`` (the kernel also for a
burst of equal whole prompts, which the engine sends to SDPA over views). Eager steps with prompts record their greedy tokens (``sampled``), so the
A/B also shows whether both give the same tokens.
Every variant runs the engine's own code (the script only wraps it in profiler ranges and sets its ``EPKIT_*``
switches). The ``before`` variant of docs/benchmarks.md (the MoE code as of 905545f, with ``torch.bincount`` and
``repeat_interleave``) is that commit's copy of this script: check it out to measure it again.
Example (2 GPUs):

    python benchmarks/engine_profile.py --dp 2 --batch 16,128 --out /tmp/prof
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REGIONS = ("meta", "attention", "route", "experts", "combine", "all_gather", "reduce_scatter", "logits", "sample")
VARIANTS = ("after", "graph", "engine-graph", "engine-graph-torch", "mixed", "mixed-graph", "prefill")
KERNEL_CATS = [  # first match wins
    ("nccl", r"nccl"),
    ("grouped_gemm (experts)", r"grouped|Grouped|cutlass.*[Gg]roup|ptr_array"),
    ("gemm (dense)", r"gemm|Gemm|GEMM|sm90_xmma|cutlass|nvjet|matmul"),
    ("softmax/topk/sort", r"softmax|topk|sort|Sort|radix|bitonic|cub"),
    ("index/gather/scatter", r"index|gather|scatter|Index|Scatter"),
    ("elementwise/reduce", r"elementwise|reduce|Reduce|vectorized|unrolled|fill|copy|Copy"),
]


def wrap(obj, attr: str, region: str) -> None:
    fn = getattr(obj, attr)

    def wrapped(*a, **kw):
        with torch.profiler.record_function("R:" + region):
            return fn(*a, **kw)

    setattr(obj, attr, wrapped)


def annotate(runner) -> None:
    """Wrap the engine's functions in profiler ranges (instance / module attributes only)."""
    import epkit.engine.attention as attention
    import epkit.engine.model as model
    import epkit.engine.moe as moe
    import epkit.engine.runner as runner_mod

    wrap(runner_mod, "build_meta", "meta")
    wrap(attention, "paged_attention", "attention")
    wrap(model, "route", "route")
    wrap(moe, "weighted_sum", "combine")
    wrap(runner.comm, "all_gather", "all_gather")
    wrap(runner.comm, "reduce_scatter", "reduce_scatter")
    wrap(runner.model, "logits", "logits")
    wrap(runner, "_sample", "sample")
    for name in ("with_sentinel", "_grouped"):
        fn = getattr(moe.LocalExperts, name)

        def method(self, *a, _fn=fn, **kw):
            with torch.profiler.record_function("R:experts"):
                return _fn(self, *a, **kw)

        setattr(moe.LocalExperts, name, method)


def base_variant(name: str) -> str:
    """The variant without its A/B suffixes (``-gmm``, ``-sdpa``, ``-triton``)."""
    return name.replace("-gmm", "").replace("-sdpa", "").replace("-triton", "")


def use_torch_kernels(on: bool, runner, moe_gemm: str = "auto", prefill: str = "auto") -> None:
    """Switch the engine's Triton kernels off (PyTorch paths) or back on, and pick the MoE GEMM
    (``EPKIT_MOE_GEMM``: auto / triton / torch) and the prefill attention (``EPKIT_PREFILL_ATTENTION``: auto /
    triton / torch); captured graphs are dropped."""
    from epkit.engine import kernels

    os.environ["EPKIT_PREFILL_ATTENTION"] = "torch" if on else prefill
    for key, value in (("EPKIT_DECODE_ATTENTION", "torch"), ("EPKIT_FUSED_KERNELS", "torch")):
        if on:
            os.environ[key] = value
        else:
            os.environ.pop(key, None)
    os.environ["EPKIT_MOE_GEMM"] = moe_gemm
    kernels.forget_verdicts()
    if runner.graphs is not None:
        runner.graphs.drop("kernel choice changed")
        runner.graphs.paged_kernel = not on and runner.graphs.paged_kernel_checked


def make_batch(runner, batch: int, ctx: int, rank: int):
    from epkit.engine.block_manager import BlockManager
    from epkit.engine.sequence import EngineRequest, SamplingParams, Sequence

    bm = BlockManager(runner.num_blocks, runner.block_size)
    make_batch.blocks = bm  # the prompts of mixed steps take blocks after these
    seqs = []
    for i in range(batch):
        s = Sequence(EngineRequest(f"r{rank}-{i}", tuple((7 * i + j) % 256 for j in range(ctx)),
                                   SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)))
        bm.allocate(s, ctx)
        s.num_computed_tokens = ctx - 1
        seqs.append(s)
    return [(s, 1) for s in seqs]


def make_prompts(runner, n: int, length: int, rank: int, tag: str, bm=None):
    """``n`` fresh prompts of ``length`` tokens, their blocks allocated, nothing computed: (seq, length) rows."""
    from epkit.engine.block_manager import BlockManager
    from epkit.engine.sequence import EngineRequest, SamplingParams, Sequence

    bm = bm or BlockManager(runner.num_blocks, runner.block_size)
    rows = []
    for i in range(n):
        s = Sequence(EngineRequest(f"{tag}{rank}-{i}", tuple((11 * i + 3 * j) % 256 for j in range(length)),
                                   SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)))
        bm.allocate(s, length)
        rows.append((s, length))
    return rows


def count_syncs(fn) -> int:
    if not torch.cuda.is_available():
        return -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, steps: int, comm) -> list[float]:
    out = []
    for _ in range(steps):
        dist.barrier(group=comm.cpu_group)
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1000)
    return out


def profile_breakdown(fn, steps: int, trace_path: str | None) -> dict:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            with torch.profiler.record_function("R:step"):
                fn()
            sync()
    regions = {}
    for e in prof.key_averages():
        if e.key.startswith("R:"):
            regions[e.key[2:]] = {"host_ms": e.cpu_time_total / 1000 / steps,
                                  "gpu_ms": getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1000 / steps,
                                  "calls_per_step": e.count / steps}
    kernels: dict[str, float] = defaultdict(float)
    launches = 0
    top: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if str(e.device_type).endswith("CUDA") and not e.key.startswith("R:"):  # kernels, not the GPU spans of our ranges
            dt = getattr(e, "self_device_time_total", 0) / 1000 / steps
            cat = next((c for c, pat in KERNEL_CATS if re.search(pat, e.key)), "other")
            kernels[cat] += dt
            top[e.key[:90]] += dt
            launches += e.count
    if trace_path:
        prof.export_chrome_trace(trace_path)
    return {"regions": regions, "gpu_kernels_ms": dict(kernels), "gpu_kernel_total_ms": sum(kernels.values()),
            "kernel_launches_per_step": launches / steps,
            "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:40])}


def graph_step(runner, batch, counts):
    """Capture runner.model.forward for this batch once; return a step function that replays it."""
    from epkit.engine.runner import step_inputs

    ids_t, pos_t, meta = step_inputs(batch, runner.block_size, runner.device, batch_decode=True)
    fwd = lambda: runner.model.forward(ids_t, pos_t, meta, runner.kv_caches, counts)  # noqa: E731
    with torch.inference_mode():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fwd()
        torch.cuda.current_stream().wait_stream(s)
        sync()
        dist.barrier(group=runner.comm.cpu_group)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            hidden = fwd()
    seqs = [s for s, _ in batch]

    def step():
        with torch.inference_mode():
            g.replay()
            logits = runner.model.logits(hidden)
            return runner._sample(logits, seqs)

    step.keep = (ids_t, pos_t, meta, hidden)  # the graph reads these addresses: they must outlive the capture
    return step


def start_rank(rank: int, args):
    """This rank's process groups (NCCL + a gloo control group, like ``epkit serve``) and ``ModelRunner`` with dummy
    weights: (runner, seconds it took to build)."""
    from epkit.engine.all2all import Communicator
    from epkit.engine.config import EngineConfig
    from epkit.engine.model import model_config_of
    from epkit.engine.runner import ModelRunner, resolve_device

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    cfg = EngineConfig(model=args.model, load_format="dummy", device=args.device, data_parallel_size=args.dp,
                       enable_expert_parallel=args.dp > 1, all2all_backend=args.backend, max_model_len=args.max_model_len,
                       max_num_seqs=max(args.batches), kv_cache_memory_bytes=args.kv_bytes)
    device = resolve_device(cfg, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=args.dp, **kw)
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    comm = Communicator(rank, args.dp, dist.group.WORLD, cpu_group)
    mc, mdir = model_config_of(cfg)
    t0 = time.perf_counter()
    runner = ModelRunner(cfg, mc, mdir, rank, device, comm)
    return runner, time.perf_counter() - t0


def variant_step(runner, args, name: str, batch_size: int, rows_of: dict, res: dict):
    """The step function that variant ``name`` times at ``batch_size`` (None where it does not run: ``graph`` off
    CUDA), after its first steps (captures, greedy tokens against eager) are recorded in ``res``. ``rows_of``: the
    ``decode`` and ``mixed`` rows per batch size and the ``prefill`` rows."""
    variant = base_variant(name)
    gemm = "torch" if "-gmm" in name else "auto"  # -gmm: torch._grouped_mm as the expert GEMMs
    # -sdpa: SDPA for multi-token sequences; -triton: the Triton prefill kernel for all of them
    prefill_attn = "torch" if "-sdpa" in name else "triton" if "-triton" in name else "auto"
    batch = rows_of["decode"][batch_size]
    counts = [batch_size] * args.dp
    if variant in ("mixed", "mixed-graph", "prefill"):
        use_torch_kernels(args.eager_torch and variant != "mixed-graph", runner, gemm, prefill_attn)
        rows = rows_of["prefill"] if variant == "prefill" else rows_of["mixed"][batch_size]
        counts = [sum(new for _, new in rows)] * args.dp
        res["tokens_per_rank"] = counts[0]
        shapes = [runner.step_shape(rows)] * args.dp if variant == "mixed-graph" else None
        if variant == "mixed-graph":
            if runner.graphs is None or not runner.graphs.mixed:
                raise RuntimeError("the runner has no mixed graph steps (see its 'graph steps:' log line)")
            first_graph_step(runner, rows, counts, shapes, res)
        else:
            res["sampled"] = list(runner.execute(rows, counts).values())
        return lambda: runner.execute(rows, counts, shapes)
    if variant == "graph":
        return graph_step(runner, batch, counts) if runner.device.type == "cuda" else None
    if variant.startswith("engine-graph"):
        if runner.graphs is None:
            raise RuntimeError("the runner has no graph steps (see its 'graph steps:' log line)")
        use_torch_kernels(variant.endswith("-torch"), runner, gemm, prefill_attn)
        shapes = [(1, args.ctx)] * args.dp
        first_graph_step(runner, batch, counts, shapes, res)
        return lambda: runner.execute(batch, counts, shapes)
    use_torch_kernels(args.eager_torch, runner, gemm, prefill_attn)
    return lambda: runner.execute(batch, counts)


def first_graph_step(runner, rows, counts, shapes, res: dict) -> None:
    """One eager step, then the same step through the engine's graphs (it captures): the capture time and the share
    of greedy tokens that equal the eager step's go into ``res``."""
    eager = runner.execute(rows, counts)
    t0 = time.perf_counter()
    graphed = runner.execute(rows, counts, shapes)  # captures
    res["first_step_with_capture_s"] = round(time.perf_counter() - t0, 3)
    res["greedy_match_vs_eager"] = sum(eager[k] == graphed[k] for k in eager) / max(1, len(eager))


def measure(fn, args, comm, res: dict, trace: str | None) -> None:
    """Warm-up, host syncs, wall time and the profiler breakdown of step function ``fn``, into ``res``."""
    for _ in range(args.warmup):
        fn()
    sync()
    res["syncs_per_step"] = count_syncs(fn)
    ms = timed(fn, args.steps, comm)
    res["wall_ms"] = {"median": sorted(ms)[len(ms) // 2], "min": min(ms), "mean": sum(ms) / len(ms)}
    res["profile"] = profile_breakdown(fn, args.profile_steps, trace)


def print_result(res: dict, name: str, batch_size: int) -> None:
    w = res.get("wall_ms", {})
    variant = base_variant(name)
    extra = (f" tokens {res.get('tokens_per_rank', batch_size)} match {res.get('greedy_match_vs_eager')} capture {res.get('first_step_with_capture_s')} s"
             if variant.startswith("engine-graph") or variant == "mixed-graph" else
             f" greedy tokens {res['sampled'][:8]}" if "sampled" in res else "")
    print(f"B={batch_size}/rank {name:6s}{extra} wall median {w.get('median', float('nan')):8.2f} ms  "
          f"syncs {res.get('syncs_per_step')}  gpu kernels "
          f"{res.get('profile', {}).get('gpu_kernel_total_ms', float('nan')):.2f} ms  {res.get('error', '')}", flush=True)


def rank_main(rank: int, args) -> None:
    runner, build_s = start_rank(rank, args)
    comm, device = runner.comm, runner.device
    annotate(runner)
    report = {"rank": rank, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dp": args.dp, "backend": args.backend, "model": args.model, "ctx": args.ctx,
              "build_s": round(build_s, 1), "results": []}
    # eager variants first, CUDA-graph captures last: a failed or hung capture loses nothing else
    graphs = ("graph", "engine-graph", "engine-graph-torch", "mixed-graph")
    plan = [(b, v) for b in args.batches for v in args.variants if base_variant(v) not in graphs]
    plan += [(b, v) for b in args.batches for v in args.variants if base_variant(v) in graphs]
    batches = {b: make_batch(runner, b, args.ctx, rank) for b in args.batches}
    bm = make_batch.blocks
    rows_of = {"decode": batches,
               "mixed": {b: batches[b] + make_prompts(runner, 1, args.prefill_len, rank, f"m{b}-", bm) for b in args.batches},
               "prefill": make_prompts(runner, args.prefill_seqs, args.ctx, rank, "p-", bm) if "prefill" in args.variants else []}
    # one prefill step, whatever the batch
    plan = [(b, v) for b, v in plan if base_variant(v) != "prefill" or b == args.batches[0]]
    for batch_size, name in plan:
        res = {"batch_per_rank": batch_size, "variant": name}
        try:
            fn = variant_step(runner, args, name, batch_size, rows_of, res)
            if fn is None:
                continue
            trace = os.path.join(args.out, f"trace_b{batch_size}_{name}.json") if args.trace and rank == 0 else None
            measure(fn, args, comm, res, trace)
        except Exception as exc:  # a failed variant (e.g. graph capture) must not lose the others
            res["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            sync()
        report["results"].append(res)
        if rank == 0:
            print_result(res, name, batch_size)
        with open(os.path.join(args.out, f"profile_rank{rank}.json"), "w") as f:  # after every result
            json.dump(report, f, indent=1)
        dist.barrier(group=comm.cpu_group)
    dist.barrier(group=comm.cpu_group)
    os._exit(0)  # not destroy_process_group: it hung at exit on 2x H200 (the call ran into its time limit)


def summarize(path: str) -> str:
    """A markdown table of the rank-0 report."""
    rep = json.load(open(path))
    lines = [f"{rep['device']} x{rep['dp']}, DP={rep['dp']} + EP, {rep['backend']}, {rep['model']}, ctx {rep['ctx']}, torch {rep['torch']}"]
    for res in rep["results"]:
        if "error" in res:
            lines.append(f"B={res['batch_per_rank']} {res['variant']}: ERROR {res['error']}")
            continue
        p = res["profile"]
        lines.append(f"\nB={res['batch_per_rank']}/rank {res['variant']}: wall {res['wall_ms']['median']:.2f} ms/step "
                     f"(min {res['wall_ms']['min']:.2f}), syncs/step {res['syncs_per_step']}, GPU kernels "
                     f"{p['gpu_kernel_total_ms']:.2f} ms/step, launches/step {p['kernel_launches_per_step']:.0f}")
        lines.append("| region | host ms | GPU ms | calls |\n|---|---|---|---|")
        for name, r in sorted(p["regions"].items(), key=lambda kv: -kv[1]["host_ms"]):
            lines.append(f"| {name} | {r['host_ms']:.2f} | {r['gpu_ms']:.2f} | {r['calls_per_step']:.0f} |")
        lines.append("| kernel category | GPU ms |\n|---|---|")
        for name, v in sorted(p["gpu_kernels_ms"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {v:.2f} |")
    return "\n".join(lines)


def trace_summary(name: str) -> str:
    """Per-step breakdown from a rank-0 chrome trace (``--trace``): kernels by category, host and GPU ms per region.

    GPU ms of a region = kernels whose launch lies inside it; NCCL kernels (own stream) land in
    "outside", and their time includes waiting for the peer rank, not just the transfer.
    """
    import bisect
    import gzip

    opener = gzip.open if name.endswith(".gz") else open
    ev = json.load(opener(name, "rt"))["traceEvents"]
    n = max(1, sum(1 for e in ev if e.get("cat") == "user_annotation" and e["name"] == "R:step"))
    step_ms = sum(e["dur"] for e in ev if e.get("cat") == "user_annotation" and e["name"] == "R:step") / 1000 / n
    kern = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    cats: dict[str, float] = defaultdict(float)
    for e in kern:
        cats[next((c for c, pat in KERNEL_CATS if re.search(pat, e["name"])), "other")] += e["dur"] / 1000 / n
    reg = sorted((e for e in ev if e.get("cat") == "user_annotation" and e["name"].startswith("R:") and e["name"] != "R:step"),
                 key=lambda e: e["ts"])
    host: dict[str, float] = defaultdict(float)
    for e in reg:
        host[e["name"][2:]] += e["dur"] / 1000 / n
    launches = {e["args"]["correlation"]: e for e in ev if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    starts = [e["ts"] for e in reg]
    gpu: dict[str, float] = defaultdict(float)
    for k in kern:
        where, launch = "outside (norms, qkv/o-proj, rope, router GEMM, residuals; NCCL)", launches.get(k["args"].get("correlation"))
        if launch:
            i = bisect.bisect_right(starts, launch["ts"]) - 1
            for j in range(i, max(-1, i - 6), -1):
                if reg[j]["ts"] <= launch["ts"] <= reg[j]["ts"] + reg[j]["dur"]:
                    where = reg[j]["name"][2:]
                    break
        gpu[where] += k["dur"] / 1000 / n

    def fmt(d):
        return ", ".join(f"{key} {v:.2f}" for key, v in sorted(d.items(), key=lambda kv: -kv[1]))

    return "\n".join([f"== {os.path.basename(name)}: {n} steps, step host span {step_ms:.1f} ms, GPU kernels {sum(cats.values()):.1f} ms "
                      f"(NCCL {cats.get('nccl', 0):.1f}), kernels/step {len(kern) / n:.0f}, CUDA runtime calls/step {len(launches) / n:.0f}",
                      "  kernels by category (ms): " + fmt(cats), "  host ms by region: " + fmt(host), "  GPU ms by region: " + fmt(gpu)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--batch", default="16,128", help="decode sequences per rank, comma-separated")
    ap.add_argument("--ctx", type=int, default=576, help="context tokens of each sequence (512 prompt + ~64 generated)")
    ap.add_argument("--prefill-len", type=int, default=512, help="tokens of the new prompt in mixed steps")
    ap.add_argument("--prefill-seqs", type=int, default=16, help="prompts of --ctx tokens in the prefill variant's step")
    ap.add_argument("--model", default="epkit-qwen3-30b-a3b-shape")
    ap.add_argument("--backend", default="allgather_reducescatter")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", default="after,graph")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eager-torch", action="store_true", help="eager variants without the Triton kernels")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-bytes", type=int, default=16 * 2**30)
    ap.add_argument("--port", type=int, default=29571)
    ap.add_argument("--trace", action="store_true", help="also write rank 0's chrome traces")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/engine_profile"))
    ap.add_argument("--summarize", default=None, help="print the table of an existing profile_rank0.json and exit")
    ap.add_argument("--trace-summary", nargs="+", default=None, help="print the breakdown of chrome traces and exit")
    args = ap.parse_args()
    if args.trace_summary:
        print("\n".join(trace_summary(t) for t in args.trace_summary))
        return
    if args.summarize:
        print(summarize(args.summarize))
        return
    args.batches = [int(b) for b in args.batch.split(",")]
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if base_variant(v) not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)} (with -gmm, -sdpa or -triton)")
    os.makedirs(args.out, exist_ok=True)
    mp.spawn(rank_main, args=(args,), nprocs=args.dp, join=True)
    print(summarize(os.path.join(args.out, "profile_rank0.json")))


if __name__ == "__main__":
    main()
