"""Host cost of one eager forward + backward of the 3D HR pathway (``gpu_blocks.py``'s 3d_l2 case, bf16 autocast +
channels-last) on the GPU host, eager PyTorch vs ours lean: wall per step (synchronised after each step, and
pipelined over 5 steps), GPU kernels and launch calls of one step (torch.profiler), and a cProfile of 3 lean steps.

    PYTHONPATH=. python benchmarks/lean_host_profile.py > lean_host_profile_<card>.txt
"""
from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_blocks  # noqa: E402


def main() -> None:
    case = gpu_blocks.CASES["3d_l2"]
    x, gf, gl = gpu_blocks.make_inputs(case, "cuda")
    for name, checkpoint in (("eager", "none"), ("lean", "lean")):
        module = gpu_blocks.build(case, "cuda", checkpoint).to(memory_format=torch.channels_last_3d)

        def step() -> None:
            gpu_blocks.step(module, x, gf, gl, True)

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        synced, pipelined = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            synced.append((time.perf_counter() - t0) * 1e3)
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            pipelined.append((time.perf_counter() - t0) / 5 * 1e3)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
        launches = {e.key: e.count for e in events if "aunchKernel" in e.key or "ynchronize" in e.key}
        print(f"{name}: step synchronised {statistics.median(synced):.2f} ms, pipelined "
              f"{statistics.median(pipelined):.2f} ms, GPU kernels {kernels}, {launches}")
        if name == "lean":
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            profiler.disable()
            for order, count in (("tottime", 30), ("cumtime", 45)):
                buf = io.StringIO()
                pstats.Stats(profiler, stream=buf).sort_stats(order).print_stats(count)
                print(buf.getvalue())


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("lean_host_profile.py needs a CUDA GPU")
    main()
