"""GPU time of a call without the host's launch overhead, for the CUDA speed tests."""
from __future__ import annotations

from typing import Callable

import torch


def graph_ms(fn: Callable[[], object], reps: int = 20) -> float:
    """Milliseconds per call of ``fn()`` replayed from a CUDA graph of ``reps`` back-to-back calls (the kernels'
    time: the host's per-launch cost, which dominates small shapes in eager mode, is not counted), best of 5
    replays after one warm-up call on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best
