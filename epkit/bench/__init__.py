"""Load generation against OpenAI-compatible servers: workloads, a streaming client, vLLM's metrics.

    from epkit.bench import RandomWorkload, run
    result = run("http://localhost:8000", "my-model", RandomWorkload(num_prompts=100, input_len=512,
                 output_len=128), max_concurrency=16)
    result["median_ttft_ms"], result.requests   # vLLM's keys; the raw per-request table

No torch, no topology: the bench talks HTTP only.
"""

from epkit.bench.datasets import (
    DATASETS,
    RandomWorkload,
    SampleRequest,
    SharedPrefixWorkload,
    ShareGPTWorkload,
    TraceWorkload,
    Workload,
    make_workload,
)
from epkit.bench.result import BenchResult, load_result, load_vllm_result, load_vllm_results
from epkit.bench.runner import LoadShape, arun, run, run_ladder

__all__ = [
    "DATASETS", "BenchResult", "LoadShape", "RandomWorkload", "SampleRequest", "ShareGPTWorkload",
    "SharedPrefixWorkload", "TraceWorkload", "Workload", "arun", "load_result", "load_vllm_result",
    "load_vllm_results", "make_workload", "run", "run_ladder",
]
