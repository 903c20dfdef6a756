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


def cuda_kernel_times(fn: Callable[[], object], reps: int = 1, warmup: int = 1) -> list[tuple[str, float, float]]:
    """``(kernel name, seconds per call, launches per call)`` of every CUDA kernel over ``reps`` profiled calls
    of ``fn()`` (torch.profiler, after ``warmup`` unprofiled calls), largest time first. GPU-side user annotations
    (``Optimizer.step#AdamW.step`` spans the optimizer's kernels) are left out: they would count those twice."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / reps / 1e6, e.count / reps)
            for e in prof.key_averages()
            if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)]  # e.g. Optimizer.step#
    return sorted(rows, key=lambda r: -r[1])
