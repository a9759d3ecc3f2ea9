"""Drive an OpenAI-compatible server with random fixed-length prompts; print and save vLLM-style metrics.

Prompts are random token ids (so a 512-token prompt is exactly 512 tokens), completions
stream with ``ignore_eos``; TTFT, ITL, TPOT and E2EL come from chunk arrival times.
Usage: python benchmarks/engine_bench.py --url http://127.0.0.1:8000 --num-prompts 400
       [--input-len 512 --output-len 128 --max-concurrency 64 --save out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import aiohttp
import numpy as np


async def one(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], output_len: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    error = None
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                return {"error": f"HTTP {r.status}: {await r.text()}", "start_s": start}
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"]:
                    arrivals.append(time.perf_counter())
    except aiohttp.ClientError as exc:
        error = repr(exc)
    return {"start_s": start, "arrivals_s": arrivals, "output_tokens": tokens, "error": error}


def summarize(records: list[dict], duration_s: float, input_len: int) -> dict:
    ok = [r for r in records if not r.get("error") and r["arrivals_s"]]
    ttft = np.array([(r["arrivals_s"][0] - r["start_s"]) * 1000 for r in ok])
    itl = np.concatenate([np.diff(r["arrivals_s"]) * 1000 for r in ok]) if ok else np.array([])
    tpot = np.array([(r["arrivals_s"][-1] - r["arrivals_s"][0]) * 1000 / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1])
    e2el = np.array([(r["arrivals_s"][-1] - r["start_s"]) * 1000 for r in ok])
    out_tokens = sum(r["output_tokens"] for r in ok)
    result = {"completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration_s,
              "total_input_tokens": input_len * len(ok), "total_output_tokens": out_tokens,
              "request_throughput": len(ok) / duration_s, "output_throughput": out_tokens / duration_s,
              "total_token_throughput": (out_tokens + input_len * len(ok)) / duration_s}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        if len(values):
            result[f"mean_{name}_ms"] = float(values.mean())
            for p in (50, 90, 99):
                result[f"p{p}_{name}_ms"] = float(np.percentile(values, p))
    errors = [r["error"] for r in records if r.get("error")]
    if errors:
        result["first_error"] = errors[0]
    return result


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(args.vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=args.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async with session.get(args.url + "/v1/models") as r:
            model = (await r.json())["data"][0]["id"]

        async def bounded(p: list[int]) -> dict:
            async with limit:
                return await one(session, args.url, model, p, args.output_len)

        start = time.perf_counter()
        records = await asyncio.gather(*(bounded(p) for p in prompts))
        duration = time.perf_counter() - start
    result = summarize(records, duration, args.input_len)
    result.update(model=model, num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                  max_concurrency=args.max_concurrency, request_rate="inf")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--num-prompts", type=int, default=400)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--vocab", type=int, default=256, help="prompt token ids are drawn from 0..vocab-1 (bytes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("--save", default=None)
    args = p.parse_args()
    result = asyncio.run(run(args))
    keys = ("completed", "failed", "duration_s", "output_throughput", "total_token_throughput", "mean_ttft_ms", "p99_ttft_ms",
            "mean_tpot_ms", "mean_itl_ms", "p99_itl_ms")
    print(json.dumps({k: round(result[k], 2) if isinstance(result.get(k), float) else result.get(k) for k in keys}))
    if args.save:
        with open(args.save, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
