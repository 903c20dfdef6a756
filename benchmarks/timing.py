"""CUDA-event timing shared by the GPU benchmark scripts (benchmarks/ is on sys.path for them and for pytest)."""
from __future__ import annotations

import time
from typing import Callable

import torch


def cuda_times(fn: Callable[[], object], iters: int, warmup: int = 0) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn()``, measured between two CUDA events on the current
    stream, after ``warmup`` untimed calls and a device synchronisation."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def host_times(fn: Callable[[], object], iters: int, warmup: int = 0) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn()`` by the host clock, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times
