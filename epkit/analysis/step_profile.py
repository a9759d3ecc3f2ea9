"""Where a serving engine's step time goes, from torch-profiler chrome traces (``epkit profile``, issue 19).

vLLM and the built-in engine annotate every engine step with a ``record_function`` range named as vLLM's
``annotate_profile`` does (``vllm/v1/worker/gpu_worker.py``)::

    execute_context_{n_ctx}({ctx_tokens})_generation_{n_gen}({gen_tokens})
    execute_{total}_context_{n_ctx}(sq{ctx_tokens}sk..sqsq..sqsk..)_generation_{n_gen}(sq{gen_tokens}sk..)  (detailed)

A step is ``prefill`` (context tokens only), ``decode`` (generation tokens only), ``mixed`` (both) or ``empty``.
Its **wall** time is the CPU annotation's duration. GPU work (kernels, memcpy, memset) belongs to the step whose
CPU range **launched** it — the CUDA runtime/driver call with the same ``args.correlation`` lies inside the
step's range on the same thread — not to the step whose range it ran in: under vLLM's async scheduling step N's
kernels run while step N+1's range is open. Kernels replayed from a CUDA graph carry the correlation of their
``cudaGraphLaunch``. A step's **GPU busy** time is the union of its GPU events' intervals (overlapping streams
count once); **host** time is wall minus GPU busy (what the GPU idled inside a step that synchronises at its end;
negative where the GPU ran past the CPU range), split by where in the range the GPU idled: before the step's first
GPU event, in the gaps between its events (inside a CUDA graph: the per-kernel scheduling cost), after its last.
Where that host time went — the top ``cpu_op`` names by self time,
the CUDA runtime/driver calls (host sync, launches) and the time outside every recorded op — is
:mod:`epkit.analysis.step_profile_host`'s (a CPU trace gets the cpu ops and python/other time only). Pure: reads
trace files, returns plain dicts.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from epkit.analysis.step_profile_host import (HOST_COLUMNS_GPU, PYTHON_COLUMN, blocks_host, host_tables,
                                              kind_host_summary, nesting, top_entries, union_us)
from epkit.errors import EpkitError

STEP_FORMAT = ("execute_context_{n}({tokens})_generation_{m}({tokens}) — vLLM's annotate_profile, or its detailed "
               "execute_{total}_context_{n}(sq{tokens}sk…)_generation_{m}(sq{tokens}sk…)")
TRACE_FORM = ("a torch-profiler chrome trace (JSON, optionally gzipped: an object with a 'traceEvents' list, "
              "as export_chrome_trace / tensorboard_trace_handler write)")
_STEP_RE = re.compile(r"^execute_(?:\d+_)?context_(\d+)\((?:sq)?(\d+)[^)]*\)_generation_(\d+)\((?:sq)?(\d+)[^)]*\)$")
KINDS = ("prefill", "mixed", "decode", "empty")

# Kernel categories: re.search on the kernel name, case-insensitive, FIRST MATCH WINS. The order settles the
# overlaps: FlashInfer's sampling kernels before attention ("flash"); communication before MoE routing ("gather"
# of NCCL's all-gather); MoE routing (the engine's Triton kernels, vLLM's topk_softmax / moe_align / permute)
# before the MoE GEMMs ("moe") and before sampling (topk/softmax); MoE expert GEMMs (fused_moe, grouped / ptr-array
# cutlass) before attention ("flash" of FlashInfer's fused MoE) and dense GEMMs ("cutlass", "gemm"); norms, RoPE,
# activations and inductor's fused pointwise/reduction kernels before sampling. A plain torch.topk/softmax/sort
# kernel counts as sampling wherever it ran: its name does not say. GPU memcpy/memset events go to "memcpy" by
# their trace category, unmatched kernels to "other".
KERNEL_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("sampling", r"sampling::|TopKTopP|SamplingFrom"),
    ("communication", r"nccl|all_?gather|reduce_?scatter|all_?reduce|all_?to_?all|cross_device|custom_?ar|"
                      r"deep_?ep|pplx"),
    ("moe_routing", r"_route_kernel|_count_pairs_kernel|_place_pairs_kernel|_gather_rows_kernel|"
                    r"_combine_rows_kernel|topk_?softmax|topk_?gating|grouped_?topk|moe_align|count_and_sort|"
                    r"moe_sum|permute|shuffle_rows|expert_map"),
    ("moe_gemm", r"_moe_gemm_kernel|fused_moe|moe|grouped_?gemm|GroupProblemShape|PtrArray|expert"),
    ("attention", r"attention|attn|flash|fmha|_paged_|paged|_prefill_attention_kernel|_write_kv_kernel|"
                  r"reshape_and_cache|kv_cache|mla_"),
    ("dense_gemm", r"gemm|gemv|nvjet|cublas|cutlass|xmma|splitK|matmul|wgmma|triton_tem_"),
    ("norm_act", r"_rms_norm_kernel|_norm_rope_kernel|_silu_mul_kernel|rms_?norm|layer_?norm|rotary|rope|silu|"
                 r"gelu|act_and_mul|triton_(?:poi|red|per)_"),
    ("sampling", r"topk|top_k|sort|softmax|argmax|multinomial|exponential|gumbel|sampl|cumsum"),
)
MEMCPY, OTHER = "memcpy", "other"
CATEGORIES = ("attention", "moe_gemm", "moe_routing", "dense_gemm", "norm_act", "sampling", "communication", MEMCPY,
              OTHER)  # the order tables show them in
assert {c for c, _ in KERNEL_CATEGORIES} <= set(CATEGORIES)
_CATEGORY_RES = tuple((c, re.compile(r, re.IGNORECASE)) for c, r in KERNEL_CATEGORIES)
_GPU_CATS = {"kernel": None, "gpu_memcpy": MEMCPY, "gpu_memset": MEMCPY, "memcpy": MEMCPY, "memset": MEMCPY}
_LAUNCH_CATS = {"cuda_runtime", "cuda_driver", "runtime", "driver"}


class ProfileError(EpkitError, ValueError):
    """A trace that cannot be read or holds no engine step annotations."""


class NoStepsError(ProfileError):
    """A readable trace without engine step annotations (vLLM's frontend profile, a trace of something else)."""


@functools.lru_cache(maxsize=4096)  # a trace repeats a few hundred kernel names millions of times
def kernel_category(name: str) -> str:
    """The category of a GPU kernel by its name (first regex of :data:`KERNEL_CATEGORIES` that matches)."""
    for category, pattern in _CATEGORY_RES:
        if pattern.search(name):
            return category
    return OTHER


def parse_step(name: str) -> dict | None:
    """An annotation's counts and kind, or None when ``name`` is not an engine step annotation."""
    m = _STEP_RE.match(name)
    if m is None:
        return None
    ctx_requests, ctx_tokens, gen_requests, gen_tokens = map(int, m.groups())
    kind = ("mixed" if ctx_tokens and gen_tokens else "prefill" if ctx_tokens
            else "decode" if gen_tokens else "empty")
    return {"kind": kind, "ctx_requests": ctx_requests, "ctx_tokens": ctx_tokens,
            "gen_requests": gen_requests, "gen_tokens": gen_tokens}


@dataclass
class Step:
    """One annotated engine step and what it launched (times in µs, as the trace holds them)."""

    name: str
    counts: dict
    start_us: float
    end_us: float
    thread: tuple = ()  # (pid, tid) of the CPU thread that ran it
    gpu: list[tuple[float, float, str, str]] = field(default_factory=list)  # (start, end, name, category)
    graph: bool = False
    cpu_ops: list[tuple[str, float]] = field(default_factory=list)  # (name, self µs)
    op_spans: list[tuple[float, float]] = field(default_factory=list)  # top-level cpu ops' (start, end)
    runtime: list[tuple[float, float, str, bool]] = field(default_factory=list)  # (start, end, name, blocks host)

    @property
    def kind(self) -> str:
        return self.counts["kind"]


def load_events(path: str | Path) -> list[dict]:
    """The trace's event list; :class:`ProfileError` naming the path and the expected form otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"{p}: no such trace file; expected {TRACE_FORM}")
    opener = gzip.open if p.name.endswith(".gz") else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{p}: not a chrome trace ({exc}); expected {TRACE_FORM}") from None
    events = doc.get("traceEvents") if isinstance(doc, dict) else doc
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ProfileError(f"{p}: not a chrome trace (no 'traceEvents' list of event objects); expected {TRACE_FORM}")
    return events


def trace_files(paths: list[str | Path]) -> list[tuple[Path, bool]]:
    """The trace files named, each with whether it came from a folder: a file as given, a folder's ``*.json`` and
    ``*.json.gz`` files (sorted)."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".json", ".json.gz")))
            if not found:
                raise ProfileError(f"{path}: folder holds no trace (*.json or *.json.gz); expected {TRACE_FORM}")
            out += [(p, True) for p in found]
        elif path.exists():
            out.append((path, False))
        else:
            raise ProfileError(f"{path}: no such file or folder; expected {TRACE_FORM} or a folder of them")
    return out


class _ThreadSteps:
    """The steps of one CPU thread, sorted by start, for 'which step holds this timestamp'."""

    def __init__(self, steps: list[Step]):
        self.steps = sorted(steps, key=lambda s: s.start_us)
        self.starts = [s.start_us for s in self.steps]
        self.max_end, end = [], float("-inf")  # latest end among steps[: i + 1]
        for s in self.steps:
            end = max(end, s.end_us)
            self.max_end.append(end)

    def at(self, ts: float) -> Step | None:
        i = bisect.bisect_right(self.starts, ts) - 1
        while i >= 0 and self.max_end[i] >= ts:  # steps do not overlap on a thread; were one nested, the
            if ts <= self.steps[i].end_us:       # innermost that holds ts wins
                return self.steps[i]
            i -= 1
        return None


def _span(e: dict) -> tuple[float, float]:
    ts = float(e.get("ts", 0.0))
    return ts, ts + float(e.get("dur", 0.0))


def _thread(e: dict) -> tuple:
    return e.get("pid"), e.get("tid")


def _collect(events: list[dict]) -> tuple[list[Step], list[dict], list[dict], list[dict]]:
    """Steps (CPU user annotations that parse), cpu ops, launch calls and GPU events, from one event list."""
    steps, cpu_ops, launches, gpu = [], [], [], []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = str(e.get("cat", "")).lower()
        if cat == "user_annotation":
            counts = parse_step(str(e.get("name", "")))
            if counts is not None:
                start, end = _span(e)
                steps.append(Step(e["name"], counts, start, end, _thread(e)))
        elif cat == "cpu_op":
            cpu_ops.append(e)
        elif cat in _LAUNCH_CATS:
            launches.append(e)
        elif cat in _GPU_CATS:
            gpu.append(e)
    return steps, cpu_ops, launches, gpu


def attribute(events: list[dict]) -> tuple[list[Step], list[tuple[float, float, str, str]], bool]:
    """The steps with their GPU work (by launch) and cpu ops, the GPU events no step launched, and whether the
    trace has GPU events at all."""
    steps, cpu_ops, launches, gpu = _collect(events)
    threads = defaultdict(list)
    for s in steps:
        threads[s.thread].append(s)
    index = {t: _ThreadSteps(ss) for t, ss in threads.items()}

    def step_at(e: dict) -> Step | None:
        t = index.get(_thread(e))
        return t.at(float(e.get("ts", 0.0))) if t else None

    copies = {(e.get("args") or {}).get("correlation"): str(e.get("name", "")) for e in gpu
              if _GPU_CATS[str(e.get("cat")).lower()] == MEMCPY}
    launched_by = {}
    for e, _, top_level in nesting(launches):
        step = step_at(e)
        corr = (e.get("args") or {}).get("correlation")
        if step is None:
            continue
        if corr is not None:
            launched_by[corr] = step
        name = str(e.get("name", ""))
        if "GraphLaunch" in name:
            step.graph = True
        if top_level:  # a driver call inside a runtime call is not counted twice
            step.runtime.append((*_span(e), name, blocks_host(name, copies.get(corr))))
    unattributed = []
    for e in gpu:
        start, end = _span(e)
        name = str(e.get("name", ""))
        item = (start, end, name, _GPU_CATS[str(e.get("cat")).lower()] or kernel_category(name))
        step = launched_by.get((e.get("args") or {}).get("correlation"))
        (step.gpu if step is not None else unattributed).append(item)
    for e, self_us, top_level in nesting(cpu_ops):
        step = step_at(e)
        if step is not None:
            step.cpu_ops.append((str(e.get("name", "")), self_us))
            if top_level:
                step.op_spans.append(_span(e))
    return steps, unattributed, bool(gpu)


def _kind_summary(steps: list[Step], has_gpu: bool, top: int) -> dict:
    """Per-step means of one kind's steps (see the module docstring for each number)."""
    n = len(steps)
    mean = lambda values: sum(values) / n  # noqa: E731
    out = {"steps": n}
    for key in ("ctx_requests", "ctx_tokens", "gen_requests", "gen_tokens"):
        out[f"{key}_per_step"] = mean([s.counts[key] for s in steps])
    wall = [(s.end_us - s.start_us) / 1e3 for s in steps]
    out.update(wall_ms_per_step=mean(wall), wall_ms_total=sum(wall))
    if has_gpu:
        busy = [union_us([(a, b) for a, b, _, _ in s.gpu]) / 1e3 for s in steps]
        inside = [union_us([(a, b) for a, b, _, _ in s.gpu], s.start_us, s.end_us) / 1e3 for s in steps]
        ctx_tokens = sum(s.counts["ctx_tokens"] for s in steps)
        categories, kernels, calls, kernel_category_of = defaultdict(float), defaultdict(float), Counter(), {}
        for s in steps:
            for start, end, name, category in s.gpu:
                categories[category] += end - start
                kernels[name] += end - start
                calls[name] += 1
                kernel_category_of[name] = category
        out.update(gpu_busy_ms_per_step=mean(busy), gpu_busy_ms_total=sum(busy),
                   host_ms_per_step=mean([w - b for w, b in zip(wall, busy)]),
                   gpu_idle_in_step_ms_per_step=mean([w - b for w, b in zip(wall, inside)]),
                   **_idle_split(steps),
                   gpu_ms_per_1k_ctx_tokens=sum(busy) / ctx_tokens * 1e3 if ctx_tokens else None,
                   graph_step_share=mean([float(s.graph) for s in steps]),
                   category_ms_per_step={c: categories.get(c, 0.0) / 1e3 / n for c in CATEGORIES},
                   top_kernels=top_entries(kernels, calls, n, top,
                                           lambda k: {"category": kernel_category_of[k]}))
    out.update(kind_host_summary(steps, has_gpu, top))
    return out


def _idle_split(steps: list[Step]) -> dict:
    """Where a step's GPU idles, in ms per step: before its first GPU event starts (the host preparing and launching
    it), in the gaps between its first and last events (launch gaps: inside a CUDA graph, the per-kernel scheduling
    cost; in an eager step, the host keeping up), and after its last event ends until the step's range closes
    (sampling on the host, output processing). Steps without GPU events count zero each; all clipped to the range."""
    before, between, after, kernels = [], [], [], []
    for s in steps:
        spans = [(max(a, s.start_us), min(b, s.end_us)) for a, b, _, _ in s.gpu]
        spans = [(a, b) for a, b in spans if b > a]
        kernels.append(len(s.gpu))
        if not spans:
            before.append(0.0), between.append(0.0), after.append(0.0)
            continue
        first, last = min(a for a, _ in spans), max(b for _, b in spans)
        before.append((first - s.start_us) / 1e3)
        between.append((last - first - union_us(spans)) / 1e3)
        after.append((s.end_us - last) / 1e3)
    n = len(steps)
    return {"gpu_idle_before_ms_per_step": sum(before) / n, "gpu_idle_between_ms_per_step": sum(between) / n,
            "gpu_idle_after_ms_per_step": sum(after) / n, "gpu_events_per_step": sum(kernels) / n}


def summarize(path: str | Path, top: int = 10, label: str | None = None) -> dict:
    """One trace file's summary: steps by kind with wall, GPU busy and host ms per step, GPU kernel time by
    category and the top-``top`` kernels per kind (a CPU trace: the top cpu ops by self time), and the GPU time
    no step launched. :class:`ProfileError` when the file is not a chrome trace or holds no step annotation."""
    path = Path(path)
    steps, unattributed, has_gpu = attribute(load_events(path))
    if not steps:
        raise NoStepsError(f"{path}: no engine step annotations (user_annotation events named {STEP_FORMAT}); "
                           "profile the engine with its torch profiler (vLLM's --profiler-config or "
                           "epkit serve's, then POST /start_profile and /stop_profile)")
    by_kind = defaultdict(list)
    for s in steps:
        by_kind[s.kind].append(s)
    return {
        "trace": label or path.name, "path": str(path), "gpu": has_gpu, "steps": len(steps),
        "kinds": {k: _kind_summary(by_kind[k], has_gpu, top) for k in KINDS if k in by_kind},
        "unattributed_gpu_ms": sum(b - a for a, b, _, _ in unattributed) / 1e3,
        "unattributed_gpu_events": len(unattributed),
    }


def summarize_all(paths: list[str | Path], top: int = 10, skipped: list[str] | None = None) -> list[dict]:
    """:func:`summarize` of every trace that ``paths`` name (folders expanded); a label (the file name) that two
    traces share becomes the path as given. A trace found in a folder that has no step annotations (vLLM's
    frontend profile lies beside the workers') is left out, its message appended to ``skipped``; a file named
    itself, or a folder with no step annotations in any trace, is an error."""
    files = trace_files(paths)
    names = Counter(p.name for p, _ in files)
    out, left_out = [], []
    for path, in_folder in files:
        try:
            out.append(summarize(path, top, path.name if names[path.name] == 1 else str(path)))
        except NoStepsError as exc:
            if not in_folder:
                raise
            left_out.append(str(exc))
    if not out:
        raise NoStepsError("; ".join(left_out))
    if skipped is not None:
        skipped += left_out
    return out


# ---- tables: the same rows as plain text (stdout) and markdown (docs/benchmarks.md) ----

_HEADLINE = (("steps", "steps"), ("ctx tok/step", "ctx_tokens_per_step"), ("gen tok/step", "gen_tokens_per_step"),
             ("wall ms/step", "wall_ms_per_step"), ("GPU busy ms/step", "gpu_busy_ms_per_step"),
             ("host ms/step (wall - busy)", "host_ms_per_step"), ("GPU ms / 1k ctx tok", "gpu_ms_per_1k_ctx_tokens"),
             ("CUDA-graph steps", "graph_step_share"), ("GPU events/step", "gpu_events_per_step"),
             ("GPU idle before 1st event ms/step", "gpu_idle_before_ms_per_step"),
             ("GPU idle between events ms/step", "gpu_idle_between_ms_per_step"),
             ("GPU idle after last event ms/step", "gpu_idle_after_ms_per_step"))
_PER_KIND = (("steps", "steps"), ("ctx req/step", "ctx_requests_per_step"), ("ctx tok/step", "ctx_tokens_per_step"),
             ("gen req/step", "gen_requests_per_step"), ("gen tok/step", "gen_tokens_per_step"),
             *_HEADLINE[3:])
_NAME_WIDTH = 90
_NUMBER = re.compile(r"^(-?[\d.]+%?|-)$")


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def _fmt(value, key: str = "") -> str:
    if value is None:
        return "-"
    if key == "graph_step_share":
        return f"{value * 100:.0f}%"
    if key == "steps" or float(value).is_integer():
        return str(int(value))
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def _short(name: str) -> str:
    return name if len(name) <= _NAME_WIDTH else name[:_NAME_WIDTH - 1] + "…"


def _used_categories(kind_summaries: list[dict]) -> list[str]:
    return [c for c in CATEGORIES if any(k.get("category_ms_per_step", {}).get(c) for k in kind_summaries)]


def _trace_tables(s: dict) -> list[Table]:
    kinds = list(s["kinds"])
    note = (f"GPU time launched outside every step: {_fmt(s['unattributed_gpu_ms'])} ms "
            f"({s['unattributed_gpu_events']} events)" if s["unattributed_gpu_events"] else "")
    columns = _PER_KIND + HOST_COLUMNS_GPU if s["gpu"] else _PER_KIND[:6]  # a CPU trace has no GPU columns
    columns += (PYTHON_COLUMN,)
    out = [Table(f"{s['trace']}: steps by kind", ["kind"] + [label for label, _ in columns],
                 [[k] + [_fmt(s["kinds"][k].get(key), key) for _, key in columns] for k in kinds], note)]
    used = _used_categories(list(s["kinds"].values()))
    if used:
        rows = [[c] + [_fmt(s["kinds"][k]["category_ms_per_step"][c]) for k in kinds] for c in used]
        rows.append(["total (kernel sum)"] + [_fmt(sum(s["kinds"][k]["category_ms_per_step"].values())) for k in kinds])
        out.append(Table(f"{s['trace']}: GPU ms per step by kernel category", ["category"] + kinds, rows))
    for k in kinds:
        if s["gpu"] and s["kinds"][k]["top_kernels"]:
            rows = [[_short(t["name"]), t["category"], _fmt(t["ms_per_step"]), _fmt(t["calls_per_step"])]
                    for t in s["kinds"][k]["top_kernels"]]
            out.append(Table(f"{s['trace']}: top kernels, {k} steps", ["kernel", "category", "ms/step", "calls/step"],
                             rows))
        out += [Table(*t) for t in host_tables(s["trace"], k, s["kinds"][k], _fmt, _short)]
    return out


def _cpu_op_rows(present: list[dict | None], per_trace: int = 5) -> list[list[str]]:
    """Self ms/step of the union of each trace's top cpu ops ("-": not among that trace's listed ones)."""
    listed = [{o["name"]: o["self_ms_per_step"] for o in p["top_cpu_ops"]} if p else {} for p in present]
    names = dict.fromkeys(n for p in present if p for n in [o["name"] for o in p["top_cpu_ops"][:per_trace]])
    return [[f"{n} self ms/step"] + [_fmt(op.get(n)) for op in listed] for n in names]


def _side_by_side(summaries: list[dict]) -> list[Table]:
    """Per step kind, one table with a column per trace: the headline and host numbers, GPU ms/step per category
    and the self ms/step of each trace's top five cpu ops."""
    out = []
    labels = [s["trace"] for s in summaries]
    gpu = any(s["gpu"] for s in summaries)
    for kind in KINDS:
        present = [s["kinds"].get(kind) for s in summaries]
        if not any(present):
            continue
        headline = (_HEADLINE + HOST_COLUMNS_GPU if gpu else _HEADLINE[:4]) + (PYTHON_COLUMN,)
        rows = [[label] + [_fmt(p.get(key), key) if p else "-" for p in present] for label, key in headline]
        for c in _used_categories([p for p in present if p]):
            rows.append([f"{c} GPU ms/step"] + [_fmt(p["category_ms_per_step"][c]) if p and "category_ms_per_step"
                                                 in p else "-" for p in present])
        rows += _cpu_op_rows(present)
        out.append(Table(f"{kind} steps, side by side", [""] + labels, rows))
    return out


def tables(summaries: list[dict]) -> list[Table]:
    """Every table ``epkit profile`` prints: with several traces first the side-by-side ones, then each trace's."""
    out = _side_by_side(summaries) if len(summaries) > 1 else []
    for s in summaries:
        out += _trace_tables(s)
    return out


def to_text(summaries: list[dict]) -> str:
    """The tables as plain aligned text: first column left, numbers right."""
    blocks = []
    for t in tables(summaries):
        grid = [t.header] + t.rows
        widths = [max(len(r[i]) for r in grid) for i in range(len(t.header))]
        numeric = [i > 0 and all(_NUMBER.match(r[i]) for r in t.rows) for i in range(len(t.header))]

        def line(r):
            return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

        lines = [t.title, line(t.header), line(["-" * w for w in widths])] + [line(r) for r in t.rows]
        blocks.append("\n".join(lines + ([t.note] if t.note else [])))
    return "\n\n".join(blocks) + "\n"


def to_markdown(summaries: list[dict]) -> str:
    """The tables as markdown (a bold title line, then a pipe table), for docs/benchmarks.md."""
    def cells(r):
        return "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"

    blocks = []
    for t in tables(summaries):
        align = ["---:" if i > 0 and all(_NUMBER.match(r[i]) for r in t.rows) else "---" for i in range(len(t.header))]
        lines = [f"**{t.title}**", "", cells(t.header), "| " + " | ".join(align) + " |"] + [cells(r) for r in t.rows]
        blocks.append("\n".join(lines + (["", t.note] if t.note else [])))
    return "\n\n".join(blocks) + "\n"
