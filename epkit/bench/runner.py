"""Drive load: turn a workload and a load shape into request records, then a BenchResult.

The load shape is open-loop arrivals (``request_rate`` with gamma gaps) and/or a closed
loop (``max_concurrency``), bounded by a request count and/or a ``duration_s``; warm-up
requests go first and are flagged, not counted. ``run`` is synchronous and safe inside
Jupyter (when an event loop already runs in this thread, the run gets its own loop in a
worker thread); ``arun`` is the coroutine; ``run_ladder`` runs several load points
(a concurrency ladder, a rate ladder, or their product) against one target.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import itertools
import math
import platform
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

import numpy as np

from epkit.bench import metrics as M
from epkit.bench.arrivals import arrival_offsets_s, check_load
from epkit.bench.client import ClientConfig, RequestRecord, encode_body, make_session, send
from epkit.bench.datasets import SampleRequest, Workload, describe, load_tokenizer
from epkit.bench.result import BenchResult


@dataclass(frozen=True)
class LoadShape:
    """How requests arrive. ``request_rate`` in req/s (inf: all due at once), gaps gamma with
    shape ``burstiness``; at most ``max_concurrency`` in flight; stop after ``max_requests``
    (default: every sample once) or ``duration_s``, whichever first; ``num_warmups`` unmeasured
    requests first; ``data_parallel_size`` > 0 pins request i to rank i mod size."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    max_requests: int | None = None
    duration_s: float | None = None
    num_warmups: int = 0
    data_parallel_size: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_load(self.request_rate, self.burstiness, self.max_concurrency)
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s={self.duration_s!r} must be > 0 or None")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests={self.max_requests!r} must be >= 1 or None")
        if self.num_warmups < 0:
            raise ValueError(f"num_warmups={self.num_warmups!r} must be >= 0")
        if self.data_parallel_size < 0:
            raise ValueError(f"data_parallel_size={self.data_parallel_size!r} must be >= 0 (0: no pinning)")
        if (self.duration_s is not None and self.max_requests is None and math.isinf(self.request_rate)
                and self.max_concurrency is None):
            raise ValueError("duration_s with request_rate=inf needs max_concurrency (or max_requests): "
                             "otherwise requests would be sent without bound")


def _schedule(samples: list[SampleRequest], shape: LoadShape) -> tuple[np.ndarray | None, int | None]:
    """(due offsets or None for 'all due now', request limit or None for 'until duration')."""
    if samples[0].timestamp_s is not None:  # trace replay: the trace sets the times
        limit = shape.max_requests or len(samples)
        return np.array([s.timestamp_s for s in itertools.islice(itertools.cycle(samples), limit)]), limit
    if shape.duration_s is not None and shape.max_requests is None:
        limit = None
    else:
        limit = shape.max_requests or len(samples)
    if math.isinf(shape.request_rate):
        return None, limit
    n = limit if limit is not None else math.ceil(shape.request_rate * shape.duration_s) + 1
    return arrival_offsets_s(n, shape.request_rate, shape.burstiness, shape.seed), n


def _shift_times(records: list[RequestRecord], shift: float) -> None:
    for r in records:
        r.start_s -= shift
        r.send_s -= shift
        r.end_s -= shift
        r.chunk_s[:] = [c - shift for c in r.chunk_s]


async def _profile_call(session, config: ClientConfig, action: str) -> None:
    """POST ``/start_profile`` or ``/stop_profile`` at the server's root, as ``vllm bench serve --profile`` does."""
    url = config.base_url.rstrip("/") + f"/{action}_profile"
    async with session.post(url, headers=config.headers) as r:
        if r.status != 200:
            text = (await r.text())[:300]
            hint = " (no profiler: start the server with --profiler-config '{\"profiler\":\"torch\"," \
                   "\"torch_profiler_dir\":\"/abs/dir\"}')" if r.status == 404 else ""
            raise ValueError(f"profile: POST {url} answered {r.status}{hint}: {text}")


async def _drive(config: ClientConfig, samples: list[SampleRequest], shape: LoadShape, tokenizer,
                 progress: bool, profile: bool = False) -> tuple[list[RequestRecord], float, tuple[float, float]]:
    """Send everything; return (records incl. warm-ups, duration_s, t0 as (unix time, perf_counter)).
    ``profile``: the server's profiler runs from after the warm-ups until every measured request has ended."""
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(shape.max_concurrency) if shape.max_concurrency else None
    records: list[RequestRecord] = []
    counter = itertools.count()

    def new_record(i: int, req: SampleRequest, warmup: bool) -> RequestRecord:
        rank = i % shape.data_parallel_size if shape.data_parallel_size else None
        return RequestRecord(index=i, prompt_len=req.prompt_len, output_len_requested=req.output_len,
                             warmup=warmup, dp_rank=rank)

    bodies = [encode_body(config, s) for s in samples]  # encoded once, off the send path
    async with make_session(config, shape.max_concurrency) as session:
        t0 = time.perf_counter()
        if shape.num_warmups:
            warm = [new_record(next(counter), samples[k % len(samples)], True) for k in range(shape.num_warmups)]

            async def warm_one(rec: RequestRecord) -> None:
                k = rec.index % len(samples)
                async with (sem or contextlib.nullcontext()):
                    await send(session, config, rec, samples[k], t0, bodies[k])

            await asyncio.gather(*(warm_one(r) for r in warm))
            records += warm
        if profile:
            await _profile_call(session, config, "start")

        offsets, limit = _schedule(samples, shape)
        bar = tqdm(total=limit, disable=not progress, desc="requests", unit="req", leave=False, file=sys.stderr)
        tasks: list[asyncio.Task] = []
        base = time.perf_counter()
        unix0 = (time.time(), base)
        _shift_times(records, base - t0)  # warm-up times become negative: t0 moves to the measured start
        t0 = base

        async def one(rec: RequestRecord, req: SampleRequest, body: bytes) -> None:
            try:
                await send(session, config, rec, req, t0, body)
            finally:
                if sem is not None:
                    sem.release()
                bar.update(1)

        for k in itertools.count():
            if limit is not None and k >= limit:
                break
            due = 0.0 if offsets is None else float(offsets[k])
            wait = t0 + due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            if shape.duration_s is not None and time.perf_counter() - t0 >= shape.duration_s:
                break
            if sem is not None:
                await sem.acquire()
                if shape.duration_s is not None and time.perf_counter() - t0 >= shape.duration_s:
                    sem.release()
                    break
            req = samples[k % len(samples)]
            rec = new_record(next(counter), req, False)
            rec.scheduled_s = due
            records.append(rec)
            tasks.append(asyncio.create_task(one(rec, req, bodies[k % len(samples)])))
        await asyncio.gather(*tasks)
        duration_s = time.perf_counter() - t0
        bar.close()
        if profile:  # after the clock stopped: writing the trace takes a while
            await _profile_call(session, config, "stop")

    if tokenizer is not None:
        for r in records:
            if r.success and not r.completion_tokens:
                r.output_tokens_tokenized = len(tokenizer.encode(r.generated_text, add_special_tokens=False))
    return records, duration_s, unix0


def _in_worker_thread_if_loop_running(coro_fn):
    """Run ``coro_fn()`` to completion: here, or in a fresh thread if a loop already runs here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="epkit-bench") as pool:
        return pool.submit(lambda: asyncio.run(coro_fn())).result()


def _metadata(t0: tuple[float, float]) -> dict:
    import aiohttp

    from epkit import __version__

    return {"client": "epkit bench", "client_version": __version__, "aiohttp_version": aiohttp.__version__,
            "python": platform.python_version(), "host": socket.gethostname(),
            "clock": "time.perf_counter (CLOCK_MONOTONIC); request times in seconds since t0",
            "t0_unix_s": t0[0], "t0_perf_counter_s": t0[1],
            "date": datetime.fromtimestamp(t0[0]).strftime("%Y%m%d-%H%M%S")}


async def arun(base_url: str, model: str, workload: Workload | Sequence[SampleRequest], *,
               endpoint: str = "/v1/completions", tokenizer=None, api_key: str | None = None,
               headers: dict | None = None, timeout_s: float = 6 * 3600.0, ignore_eos: bool = True,
               extra_body: dict | None = None, request_rate: float = math.inf, burstiness: float = 1.0,
               max_concurrency: int | None = None, max_requests: int | None = None,
               duration_s: float | None = None, num_warmups: int = 0, data_parallel_size: int = 0,
               seed: int = 0, percentiles: Sequence[float] = M.DEFAULT_PERCENTILES,
               goodput_slos_ms: dict[str, float] | None = None, label: str | None = None,
               progress: bool = True, profile: bool = False) -> BenchResult:
    """The coroutine behind :func:`run` (same arguments), for callers with their own loop."""
    shape = LoadShape(request_rate, burstiness, max_concurrency, max_requests, duration_s, num_warmups,
                      data_parallel_size, seed)
    config = ClientConfig(base_url, model, endpoint, api_key, dict(headers or {}), timeout_s,
                          ignore_eos=ignore_eos, extra_body=dict(extra_body or {}))
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if isinstance(workload, Workload):
        samples, wl_meta = workload.sample(tok), describe(workload)
    else:
        samples, wl_meta = list(workload), {"dataset": "custom", "num_prompts": len(workload)}
    if not samples:
        raise ValueError(f"workload {wl_meta} produced no request")
    gc.collect()
    gc.freeze()  # as vLLM's client: what exists now is never scanned during the run (shorter GC pauses)
    try:
        records, duration_s, unix0 = await _drive(config, samples, shape, tok, progress, profile)
    finally:
        gc.unfreeze()
    table = M.request_table(records)
    metrics = M.summarize(table, duration_s, percentiles, goodput_slos_ms, max_concurrency)
    cfg = {"base_url": base_url, "model": model, "endpoint": endpoint, "label": label,
           "tokenizer": tokenizer if isinstance(tokenizer, str) else None, "workload": wl_meta,
           "num_prompts": len(samples), **asdict(shape), "ignore_eos": ignore_eos,
           "headers": sorted((headers or {}).keys()), "percentiles": list(percentiles),
           "goodput_slos_ms": goodput_slos_ms, "profile": profile}
    return BenchResult(metrics, table, cfg, _metadata(unix0))


def run(base_url: str, model: str, workload: Workload | Sequence[SampleRequest], **kwargs) -> BenchResult:
    """Run one load point against an OpenAI-compatible server and return its BenchResult.

    ``workload`` is a :mod:`epkit.bench.datasets` workload (or a list of SampleRequest);
    keyword arguments are those of :func:`arun`: ``endpoint``, ``tokenizer``, ``api_key``,
    ``headers``, ``timeout_s``, ``ignore_eos``, ``request_rate``, ``burstiness``,
    ``max_concurrency``, ``max_requests``, ``duration_s``, ``num_warmups``,
    ``data_parallel_size``, ``seed``, ``percentiles``, ``goodput_slos_ms``, ``label``,
    ``progress``, ``profile`` (the server's torch profiler over the measured requests: POST
    /start_profile after the warm-ups, /stop_profile after the last request, as ``vllm bench serve --profile``). Failed requests are rows of the result, never exceptions; bad arguments
    raise ``ValueError`` before anything is sent. Works inside Jupyter.
    """
    return _in_worker_thread_if_loop_running(lambda: arun(base_url, model, workload, **kwargs))


def run_ladder(base_url: str, model: str, workload: Workload | Sequence[SampleRequest], *,
               request_rates: Sequence[float] = (math.inf,), max_concurrencies: Sequence[int | None] = (None,),
               **kwargs) -> list[BenchResult]:
    """One result per (rate, concurrency) pair, rates outer, in the order given, one target."""
    for r, c in itertools.product(request_rates, max_concurrencies):
        LoadShape(request_rate=r, max_concurrency=c)  # check every point before sending anything
    return [run(base_url, model, workload, request_rate=r, max_concurrency=c, **kwargs)
            for r, c in itertools.product(request_rates, max_concurrencies)]
