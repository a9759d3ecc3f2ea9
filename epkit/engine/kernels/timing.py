"""The CUDA-graph timing harness of the kernels' first-use checks: a kernel that must also be faster than
PyTorch's path (the MoE expert GEMMs) is timed as graph replays, since steps of that size run as graphs and
eager timing would mostly measure launch costs."""

from __future__ import annotations

import torch


def graph_ms(fn, reps: int = 20) -> float:
    """Mean milliseconds of one replay of ``fn`` captured in a CUDA graph (warmed up eagerly on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads (a KV transfer's) may sync
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps
