"""``epkit bench``: drive load at an OpenAI-compatible server, print vLLM's summary, save the result.

Flags are spelled as ``vllm bench serve``'s where the two overlap. ``--request-rate`` and
``--max-concurrency`` take comma-separated lists: every (rate, concurrency) pair is one
load point of a ladder against the same server, each saved to its own result file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import urllib.parse

from epkit.bench.datasets import DATASETS, make_workload
from epkit.errors import EpkitError


def _floats(text: str) -> list[float]:
    """argparse type: a comma list of numbers (``inf`` allowed)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        try:
            value = float(item)
        except ValueError:
            where = f" in {text!r}" if "," in text else ""
            raise argparse.ArgumentTypeError(f"{item!r}{where} is not a number (or a comma list such as 1,4,inf)") \
                from None
        if value != value:
            raise argparse.ArgumentTypeError(f"{text!r}: nan is not a value")
        out.append(value)
    return out


def _percentiles(text: str) -> list[float]:
    values = _floats(text)
    bad = [v for v in values if not 0 <= v <= 100]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]:g} is not a percentile in [0, 100]")
    return values


def _concurrencies(text: str) -> list[int | None]:
    """argparse type: a comma list of integers (``none``/``inf``: unbounded)."""
    out: list[int | None] = []
    for item in (x.strip() for x in text.split(",")):
        if item.lower() in ("none", "inf"):
            out.append(None)
            continue
        try:
            out.append(int(item))  # the bounds are LoadShape's to check, with the others
        except ValueError:
            where = f" in {text!r}" if "," in text else ""
            raise argparse.ArgumentTypeError(f"{item!r}{where} is not an integer (or none/inf)") from None
    return out


def _positive(kind):
    """argparse type: a number of ``kind`` > 0."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value
    parse.__name__ = "positive"
    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} must be a JSON object such as '{{\"temperature\": 0}}'")
    return value


def _base_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"{text!r} must be an http(s) URL such as http://localhost:8000")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epkit bench", description=__doc__.split("\n")[0])
    t = p.add_argument_group("target")
    t.add_argument("--base-url", type=_base_url, help="server root, e.g. http://localhost:8000 (else --host/--port)")
    t.add_argument("--host", default="127.0.0.1", help="server host without --base-url (default %(default)s)")
    t.add_argument("--port", type=_port, default=8000, help="server port without --base-url (default %(default)s)")
    t.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"],
                   help="OpenAI API route (default %(default)s)")
    t.add_argument("--model", required=True, help="model name sent in each request")
    t.add_argument("--served-model-name", help="name sent in requests if it differs from --model")
    t.add_argument("--tokenizer", help="tokenizer path or hub id (text prompts, length counts); default: none")
    t.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    t.add_argument("--header", nargs="+", default=[], metavar="KEY=VALUE", help="extra HTTP headers")
    t.add_argument("--extra-body", type=_json_object, default={}, help="JSON merged into every request body")
    t.add_argument("--timeout", type=_positive(float), default=6 * 3600.0, help="per-request timeout, seconds")

    w = p.add_argument_group("workload")
    w.add_argument("--dataset-name", default="random", choices=sorted(DATASETS), help="workload (default %(default)s)")
    w.add_argument("--dataset-path", help="ShareGPT JSON or trace JSONL")
    w.add_argument("--num-prompts", type=_positive(int), default=1000, help="requests to draw (default %(default)s)")
    w.add_argument("--seed", type=int, default=0, help="random seed of prompts and arrivals (default %(default)s)")
    w.add_argument("--ignore-eos", action="store_true", help="ask the server to generate exactly the output length")
    w.add_argument("--random-input-len", type=_positive(int), default=1024, help="random: prompt tokens (default %(default)s)")
    w.add_argument("--random-output-len", type=_positive(int), default=128, help="random: output tokens (default %(default)s)")
    w.add_argument("--random-range-ratio", type=float, default=0.0, help="random: lengths vary by ± this share (default %(default)s)")
    w.add_argument("--random-prefix-len", type=int, default=0, help="random: shared prefix tokens (default %(default)s)")
    w.add_argument("--vocab-size", type=int, default=256, help="token ids are drawn below this without --tokenizer")
    w.add_argument("--prefix-repetition-prefix-len", type=int, default=256, help="prefix_repetition: prefix tokens")
    w.add_argument("--prefix-repetition-suffix-len", type=int, default=256, help="prefix_repetition: suffix tokens")
    w.add_argument("--prefix-repetition-num-prefixes", type=int, default=10, help="prefix_repetition: distinct prefixes")
    w.add_argument("--prefix-repetition-output-len", type=int, default=128, help="prefix_repetition: output tokens")
    w.add_argument("--sharegpt-output-len", type=int, default=None, help="sharegpt: output tokens (default: the conversation's)")
    w.add_argument("--timed-trace-sec-multiplier", type=float, default=0.001,
                   help="seconds per trace timestamp unit (Mooncake: ms, 0.001)")

    ld = p.add_argument_group("load")
    ld.add_argument("--request-rate", type=_floats, default=[math.inf], help="req/s, comma list for a ladder; inf")
    ld.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, inf constant gaps")
    ld.add_argument("--max-concurrency", type=_concurrencies, default=[None], help="comma list for a ladder")
    ld.add_argument("--num-warmups", type=int, default=0, help="requests sent first and left out of the metrics")
    ld.add_argument("--duration", type=_positive(float), default=None, help="stop sending after this many seconds")
    ld.add_argument("--max-requests", type=int, default=None, help="stop after this many (default: --num-prompts)")
    ld.add_argument("--data-parallel-size", type=int, default=0,
                    help="pin request i to DP rank i mod N via the X-data-parallel-rank header")

    o = p.add_argument_group("output")
    o.add_argument("--metric-percentiles", type=_percentiles, default=[50.0, 90.0, 99.0], help="comma list in [0, 100] (default 50,90,99)")
    o.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el", help="accepted for vLLM parity; all are kept")
    o.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50")
    o.add_argument("--save-result", action="store_true", help="write the result JSON (vLLM's keys)")
    o.add_argument("--result-dir", default=".", help="folder for --save-result (default: here)")
    o.add_argument("--result-filename", default=None, help="file name for --save-result (one load point only)")
    o.add_argument("--label", default=None, help="label stored in the result")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    o.add_argument("--profile", action="store_true",
                   help="POST /start_profile after the warm-ups and /stop_profile after the run (the server's torch "
                   "profiler: vLLM or epkit serve started with --profiler-config)")
    return p


def workload_from_args(a: argparse.Namespace):
    """The workload the flags describe."""
    name = a.dataset_name
    if name == "random":
        return make_workload(name, num_prompts=a.num_prompts, input_len=a.random_input_len,
                             output_len=a.random_output_len, range_ratio=a.random_range_ratio,
                             prefix_len=a.random_prefix_len, vocab_size=a.vocab_size, seed=a.seed)
    if name in ("prefix_repetition", "shared_prefix"):
        return make_workload(name, num_prompts=a.num_prompts, prefix_len=a.prefix_repetition_prefix_len,
                             suffix_len=a.prefix_repetition_suffix_len,
                             num_prefixes=a.prefix_repetition_num_prefixes,
                             output_len=a.prefix_repetition_output_len, vocab_size=a.vocab_size, seed=a.seed)
    if not a.dataset_path:
        raise ValueError(f"--dataset-name {name} needs --dataset-path")
    if name == "sharegpt":
        return make_workload(name, path=a.dataset_path, num_prompts=a.num_prompts,
                             output_len=a.sharegpt_output_len, seed=a.seed)
    return make_workload(name, path=a.dataset_path, num_prompts=a.num_prompts if a.num_prompts != 1000 else 0,
                         time_scale_s=a.timed_trace_sec_multiplier, vocab_size=a.vocab_size, seed=a.seed)


def _goodput(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    from epkit.bench.metrics import GOODPUT_METRICS

    out = {}
    for item in items:
        key, sep, val = item.partition(":")
        if not sep:
            raise ValueError(f"--goodput {item!r}: expected KEY:MS, e.g. ttft:500")
        if key not in GOODPUT_METRICS:
            raise ValueError(f"--goodput {item!r}: {key!r} is not an SLO key; allowed: {', '.join(GOODPUT_METRICS)}")
        try:
            out[key] = float(val)
        except ValueError:
            out[key] = -1.0
        if not out[key] > 0:
            raise ValueError(f"--goodput {item!r}: {val!r} is not a number of milliseconds > 0")
    return out


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    from epkit.bench.runner import LoadShape, run

    try:
        headers = {}
        for h in a.header:
            k, sep, v = h.partition("=")
            if not sep:
                raise ValueError(f"--header {h!r}: expected KEY=VALUE")
            headers[k] = v
        goodput = _goodput(a.goodput)
        for r in a.request_rate:
            for c in a.max_concurrency:
                LoadShape(r, a.burstiness, c, a.max_requests, a.duration, a.num_warmups, a.data_parallel_size)
        if a.dataset_path is not None and not os.path.isfile(a.dataset_path):
            raise ValueError(f"--dataset-path {a.dataset_path!r} is not a file")
        if a.save_result and a.result_dir and os.path.exists(a.result_dir) and not os.path.isdir(a.result_dir):
            raise ValueError(f"--result-dir {a.result_dir!r} is not a folder")
        workload = workload_from_args(a)
    except (ValueError, OSError, EpkitError) as e:
        print(f"epkit bench: error: {e}", file=sys.stderr)
        return 2
    base_url = a.base_url or f"http://{a.host}:{a.port}"
    status = 0
    for rate in a.request_rate:
        for conc in a.max_concurrency:
            print(f"== {base_url}{a.endpoint}  request_rate={rate}  burstiness={a.burstiness}  "
                  f"max_concurrency={conc}", flush=True)
            try:
                result = run(base_url, a.served_model_name or a.model, workload, endpoint=a.endpoint,
                             tokenizer=a.tokenizer, api_key=a.api_key, headers=headers, timeout_s=a.timeout,
                             ignore_eos=a.ignore_eos, extra_body=a.extra_body, request_rate=rate,
                             burstiness=a.burstiness, max_concurrency=conc, max_requests=a.max_requests,
                             duration_s=a.duration, num_warmups=a.num_warmups,
                             data_parallel_size=a.data_parallel_size, seed=a.seed,
                             percentiles=a.metric_percentiles, goodput_slos_ms=goodput, label=a.label,
                             progress=not a.disable_tqdm, profile=a.profile)
            except (ValueError, OSError, EpkitError) as e:
                print(f"epkit bench: error: {e}", file=sys.stderr)
                return 2
            print(result.summary())
            failed = result.requests[~result.requests["success"].astype(bool)]
            if len(failed):
                print(f"{len(failed)} failed requests; first errors:", file=sys.stderr)
                for err in failed["error"].head(3):
                    print(f"  {err}", file=sys.stderr)
            if result["completed"] == 0:
                print(f"epkit bench: error: every request to {base_url}{a.endpoint} failed", file=sys.stderr)
                status = 1
            if a.save_result:
                path = os.path.join(a.result_dir, a.result_filename) if a.result_filename and \
                    len(a.request_rate) * len(a.max_concurrency) == 1 else a.result_dir
                print(f"saved {result.save(path)}")
    return status
