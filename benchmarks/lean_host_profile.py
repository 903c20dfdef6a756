"""Host cost of one eager forward + backward of the 3D HR pathway (``gpu_blocks.py``'s 3d_l2 case, bf16 autocast +
channels-last) on the GPU host, eager PyTorch vs ours lean: wall per step (synchronised after each step, and
pipelined over 5 steps), GPU kernels and launch calls of one step (torch.profiler), the GPU time of one step by
kernel (largest first: where a graphed step's time goes, as graphs replay the same kernels), and a cProfile of 3 lean
steps.

    PYTHONPATH=. python benchmarks/lean_host_profile.py > lean_host_profile_<card>.txt
    PYTHONPATH=. python benchmarks/lean_host_profile.py --python-key   # FastLauncher's key in Python (A/B)
"""
from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_blocks  # noqa: E402
from timing import cuda_kernel_times, host_times  # noqa: E402


def main() -> None:
    case = gpu_blocks.CASES["3d_l2"]
    torch.backends.cudnn.benchmark = True  # as gpu_blocks.py: cuDNN's tuned algorithms and the measured backend choices
    x, gf, gl = gpu_blocks.make_inputs(case, "cuda")
    for name, checkpoint in (("eager", "none"), ("lean", "lean")):
        module = gpu_blocks.build(case, "cuda", checkpoint).to(memory_format=torch.channels_last_3d)

        def step() -> None:
            gpu_blocks.step(module, x, gf, gl, True)

        def synced(steps: int) -> None:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()

        synced(5)  # warm-up: cuDNN and Triton choices, compiles
        one = host_times(lambda: synced(1), 5)
        pipelined = [ms / 5 for ms in host_times(lambda: synced(5), 3)]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            synced(1)
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
        launches = {e.key: e.count for e in events if "aunchKernel" in e.key or "ynchronize" in e.key}
        print(f"{name}: step synchronised {statistics.median(one):.2f} ms, pipelined "
              f"{statistics.median(pipelined):.2f} ms, GPU kernels {kernels}, {launches}")
        rows = cuda_kernel_times(step, reps=3)
        total = sum(r[1] for r in rows)
        print(f"{name}: GPU kernel time per step {total * 1e3:.3f} ms; by kernel (us per step, launches per step):")
        for kernel, seconds, count in rows[:25]:
            print(f"  {seconds * 1e6:9.1f} {count:5.0f}  {kernel[:110]}")
        if name == "lean":
            profiler = cProfile.Profile()
            profiler.enable()
            synced(3)
            profiler.disable()
            for order, count in (("tottime", 30), ("cumtime", 45)):
                buf = io.StringIO()
                pstats.Stats(profiler, stream=buf).sort_stats(order).print_stats(count)
                print(buf.getvalue())


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("lean_host_profile.py needs a CUDA GPU")
    if "--python-key" in sys.argv[1:]:
        from hmedn_fast.ops.triton import launch

        launch._args_key = launch._python_args_key
        print("FastLauncher key: Python (launch._python_args_key)")
    main()
