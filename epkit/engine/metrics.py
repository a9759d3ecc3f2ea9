"""Prometheus metrics of the API servers: epkit's own series and vLLM's names for the same quantities.

``epkit:*`` series carry a ``dp_rank`` label where they are per rank. The ``vllm:*`` series are named,
typed and labelled as vLLM 0.32's (``model_name`` and ``engine`` = the DP rank; vLLM's default histogram
buckets), so a Grafana dashboard made for vLLM reads the built-in engine unchanged:
``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (gauges),
``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
``vllm:e2e_request_latency_seconds`` (histograms), ``vllm:prompt_tokens``, ``vllm:generation_tokens``,
``vllm:num_preemptions``, ``vllm:prefix_cache_queries``, ``vllm:prefix_cache_hits`` (counters, exposed with
``_total``; the prefix cache's in prompt tokens looked up and found at each request's first admission, as vLLM's).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)

# vLLM 0.32's default buckets (vllm/v1/metrics/buckets.py), so quantiles read the same on both engines
VLLM_TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                       40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
VLLM_E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                      960.0, 1920.0, 7680.0)


def _gauge(*args, **kwargs) -> Gauge:
    """A gauge that every API server sets to the same value (from the engine cores' reports): with several
    servers (prometheus_client's multiprocess mode) the exposition shows the most recent value."""
    return Gauge(*args, multiprocess_mode="mostrecent", **kwargs)


class Metrics:
    """Prometheus metrics of the API servers: ``epkit:*`` and vLLM's ``vllm:*`` names (module docstring).

    With several API servers (``--api-server-count``, by default one per DP rank as in vLLM)
    the launcher points ``PROMETHEUS_MULTIPROC_DIR`` at a shared folder: counters and histograms
    add up over the servers, gauges show the latest value, and any server's ``/metrics`` shows
    the whole deployment (vLLM does the same)."""

    def __init__(self, model: str, dp_size: int, server_index: int = 0):
        self.registry = CollectorRegistry()
        self.server_index = server_index
        r, labels = self.registry, ["model_name"]
        self.running = _gauge("epkit:num_requests_running", "Requests running, per DP rank", ["model_name", "dp_rank"], registry=r)
        self.waiting = _gauge("epkit:num_requests_waiting", "Requests waiting, per DP rank", ["model_name", "dp_rank"], registry=r)
        self.prompt_tokens = Counter("epkit:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("epkit:generation_tokens", "Tokens generated", labels, registry=r)
        self.ttft = Histogram("epkit:time_to_first_token_seconds", "Time to first token", labels, buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("epkit:inter_token_latency_seconds", "Inter-token latency", labels, buckets=LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram("epkit:e2e_request_latency_seconds", "Request latency", labels, buckets=LATENCY_BUCKETS_S, registry=r)
        self.success = Counter("epkit:request_success", "Finished requests", ["model_name", "finished_reason"], registry=r)
        self.preemptions = Counter("epkit:num_preemptions", "Sequences preempted for KV space, per DP rank",
                                   ["model_name", "dp_rank"], registry=r)
        self._preempted = [0] * dp_size
        # EPLB (rank 0 reports; see docs/engine.md): the last measured step and the last rearrangement
        self.eplb_balancedness = _gauge("epkit:eplb_balancedness", "EPLB: mean / max tokens per EP rank (vLLM's measure) "
                                       "at the last logged step", labels, registry=r)
        self.eplb_avg_tokens = _gauge("epkit:eplb_avg_tokens", "EPLB: sum over MoE layers of the mean tokens per EP rank "
                                     "at the last logged step", labels, registry=r)
        self.eplb_max_tokens = _gauge("epkit:eplb_max_tokens", "EPLB: sum over MoE layers of the max tokens per EP rank "
                                     "at the last logged step", labels, registry=r)
        self.eplb_rank_tokens = _gauge("epkit:eplb_rank_tokens", "EPLB: (token, expert) pairs computed by each EP rank's "
                                      "slots, all MoE layers, at the last logged step", ["model_name", "dp_rank"], registry=r)
        self.eplb_rearrangements = _gauge("epkit:eplb_rearrangements", "EPLB: rearrangements so far", labels, registry=r)
        self.eplb_window_balancedness = _gauge("epkit:eplb_window_balancedness", "EPLB: balancedness of the last window "
                                              "under the old and the new placement", ["model_name", "placement"], registry=r)
        self.eplb_median_step = _gauge("epkit:eplb_median_step_seconds", "EPLB: rank 0's median step time between the last "
                                      "two rearrangements", labels, registry=r)
        # disaggregated prefill/decode: a prefill's blocks kept for remote decodes (they count in kv_cache_usage_perc)
        self.kv_held_blocks = _gauge("epkit:kv_transfer_held_blocks", "KV blocks held for remote decodes (prefill "
                                     "side), per DP rank", ["model_name", "dp_rank"], registry=r)
        self.kv_held_requests = _gauge("epkit:kv_transfer_held_requests", "Finished prefills whose KV blocks wait for "
                                       "their decode, per DP rank", ["model_name", "dp_rank"], registry=r)
        # vLLM's names for the same quantities, per engine (DP rank), as vLLM labels them
        vl = ["model_name", "engine"]
        self.vllm_running = _gauge("vllm:num_requests_running", "Number of requests in model execution batches.", vl, registry=r)
        self.vllm_waiting = _gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", vl, registry=r)
        self.vllm_kv_usage = _gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", vl, registry=r)
        self.vllm_preemptions = Counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", vl,
                                        registry=r)
        vllm_prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", vl, registry=r)
        vllm_generation = Counter("vllm:generation_tokens", "Number of generation tokens processed.", vl, registry=r)
        vllm_cache_queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried "
                                     "tokens.", vl, registry=r)
        vllm_cache_hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", vl,
                                  registry=r)
        vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", vl,
                              buckets=VLLM_TTFT_BUCKETS_S, registry=r)
        vllm_itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", vl,
                             buckets=VLLM_ITL_BUCKETS_S, registry=r)
        vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", vl,
                             buckets=VLLM_E2E_BUCKETS_S, registry=r)
        self.model = model
        # the per-token series, bound once (``labels()`` is a dict lookup under a lock on every call)
        self.ttft_m, self.itl_m, self.e2e_m = (h.labels(model) for h in (self.ttft, self.itl, self.e2e))
        self.prompt_m, self.generation_m = self.prompt_tokens.labels(model), self.generation_tokens.labels(model)
        self.vllm = [SimpleNamespace(ttft=vllm_ttft.labels(model, str(rank)), itl=vllm_itl.labels(model, str(rank)),
                                     e2e=vllm_e2e.labels(model, str(rank)), prompt=vllm_prompt.labels(model, str(rank)),
                                     generation=vllm_generation.labels(model, str(rank)),
                                     cache_queries=vllm_cache_queries.labels(model, str(rank)),
                                     cache_hits=vllm_cache_hits.labels(model, str(rank)))
                     for rank in range(dp_size)]
        for rank in range(dp_size):
            self.set_load(rank, 0, 0)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of ``/metrics``: with several API servers, the whole deployment's series."""
        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def set_eplb(self, stats: dict) -> None:
        m = self.model
        if "balancedness" in stats:
            self.eplb_balancedness.labels(m).set(stats["balancedness"])
            self.eplb_avg_tokens.labels(m).set(stats["avg_tokens"])
            self.eplb_max_tokens.labels(m).set(stats["max_tokens"])
            for rank, tokens in enumerate(stats.get("rank_tokens") or []):
                self.eplb_rank_tokens.labels(m, str(rank)).set(tokens)
        self.eplb_rearrangements.labels(m).set(stats.get("rearrangements", 0))
        if "window_balancedness_before" in stats:
            self.eplb_window_balancedness.labels(m, "before").set(stats["window_balancedness_before"])
            self.eplb_window_balancedness.labels(m, "after").set(stats["window_balancedness_after"])
            if stats.get("median_step_ms") == stats.get("median_step_ms"):  # not NaN
                self.eplb_median_step.labels(m).set(stats["median_step_ms"] / 1e3)

    def set_kv_held(self, rank: int, requests: int, blocks: int) -> None:
        """A DP rank's KV held for remote decodes (``--kv-transfer-config``)."""
        self.kv_held_requests.labels(self.model, str(rank)).set(requests)
        self.kv_held_blocks.labels(self.model, str(rank)).set(blocks)

    def set_load(self, rank: int, running: int, waiting: int, preemptions: int = 0, kv_usage: float = 0.0) -> None:
        """A DP rank's report: requests running and waiting, preemptions so far, KV cache usage (0..1)."""
        m, r = self.model, str(rank)
        self.running.labels(m, r).set(running)
        self.waiting.labels(m, r).set(waiting)
        self.vllm_running.labels(m, r).set(running)
        self.vllm_waiting.labels(m, r).set(waiting)
        self.vllm_kv_usage.labels(m, r).set(kv_usage)
        if preemptions > self._preempted[rank]:
            if self.server_index == 0:  # every server hears every core: one of them counts
                self.preemptions.labels(m, r).inc(preemptions - self._preempted[rank])
                self.vllm_preemptions.labels(m, r).inc(preemptions - self._preempted[rank])
            self._preempted[rank] = preemptions
