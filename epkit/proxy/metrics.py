"""The router's Prometheus series (``/metrics``): per-phase latencies, outcomes, load per instance, retries.

Names start with ``epkit:proxy_`` so they never collide with an engine's ``epkit:*`` / ``vllm:*`` series when
both are scraped into one Prometheus. ``instance`` labels are the instances' base URLs."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                   160.0, 640.0)
MS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)

# requests by how they ended (the `outcome` label of epkit:proxy_requests_total)
OUTCOMES = {
    "ok": "the decode's reply reached the client whole",
    "client_error": "the request was refused before or at prefill with a 4xx (bad JSON, unknown model, the "
                    "prefill instance's own 4xx)",
    "prefill_unavailable": "no prefill instance answered (502)",
    "decode_unavailable": "no decode instance could be reached after the prefill (502; the prefill's KV released)",
    "decode_error": "the decode instance answered with an error, or its stream broke (the prefill's KV released "
                    "when the error came before the reply started)",
    "client_disconnected": "the client left mid-stream; the decode request was closed (the engine aborts it)",
}


class ProxyMetrics:
    """The router's series, in a registry of its own (so several routers can live in one process, e.g. tests)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        inst = ["instance"]
        self.prefill_seconds = Histogram("epkit:proxy_prefill_seconds", "Prefill call: request sent to the "
                                         "prefill's whole reply (the 1-token response with kv_transfer_params)",
                                         inst, buckets=SECONDS_BUCKETS, registry=r)
        self.decode_ttft_seconds = Histogram("epkit:proxy_decode_ttft_seconds", "Streamed decode call: request sent "
                                             "to its first event", inst, buckets=SECONDS_BUCKETS, registry=r)
        self.decode_seconds = Histogram("epkit:proxy_decode_seconds", "Decode call: request sent to the end of its "
                                        "reply", inst, buckets=SECONDS_BUCKETS, registry=r)
        self.kv_transfer_ms = Histogram("epkit:proxy_kv_transfer_milliseconds", "KV transfer time the decode "
                                        "instance reports (epkit_kv_transfer.ms; absent from engines that do not "
                                        "report it)", inst, buckets=MS_BUCKETS, registry=r)
        self.requests = Counter("epkit:proxy_requests", "Requests by endpoint and outcome (" +
                                "; ".join(f"{k}: {v}" for k, v in OUTCOMES.items()) + ")",
                                ["endpoint", "outcome"], registry=r)
        self.routed = Counter("epkit:proxy_routed_requests", "Calls sent to each instance (retries included)",
                              ["role", "instance"], registry=r)
        self.in_flight = Gauge("epkit:proxy_in_flight_requests", "Calls in flight on each instance through this router",
                               ["role", "instance"], registry=r)
        self.upstream_errors = Counter("epkit:proxy_upstream_errors", "Calls to an instance that failed (connection "
                                       "error or 5xx)", ["role", "instance"], registry=r)
        self.retries = Counter("epkit:proxy_retries", "Calls retried on another instance of the same side",
                               ["role"], registry=r)
        self.prefills_without_kv = Counter("epkit:proxy_prefills_without_kv", "Prefill replies without "
                                           "kv_transfer_params (an instance without a KV connector): the decode "
                                           "recomputes the prompt, so the request is not disaggregated",
                                           ["instance"], registry=r)
        self.kv_releases = Counter("epkit:proxy_kv_releases", "Prefill KV releases asked after a failed decode, by "
                                   "result (released, unsupported: the instance has no /epkit/kv/release, e.g. vLLM; "
                                   "not_held; failed)", ["instance", "outcome"], registry=r)

    def declare(self, role: str, urls: tuple[str, ...]) -> None:
        """Show every instance's series at 0 from the start (a scrape before the first request sees them all)."""
        for url in urls:
            self.in_flight.labels(role, url).set(0)
            self.routed.labels(role, url)
            self.upstream_errors.labels(role, url)
        self.retries.labels(role)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
