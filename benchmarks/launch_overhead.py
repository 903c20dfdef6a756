"""Host time per launch of a Triton kernel with as many arguments as our norm and loss kernels (12 tensors, 24 ints,
2 floats): ``kernel[grid](...)``; Triton's compiled-kernel launcher called with the tensors and the launch metadata
(what ``FastLauncher`` did up to stop 27, without its key); ``FastLauncher`` with its Python key
(``launch._python_args_key``) and with the compiled extension's (``launch_key``; CUDA tensors passed as
data-pointer ints, no launch metadata without a launch-enter hook). Launches are pipelined (one synchronisation per
2000); the kernel stores one value, so the GPU never holds the host up. Prints a table and writes
``launch_overhead_<card>.json``.

    PYTHONPATH=. python benchmarks/launch_overhead.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import card_slug, environment  # noqa: E402
from timing import host_times  # noqa: E402

from hmedn_fast.ops.triton import launch  # noqa: E402
from hmedn_fast.ops.triton.launch import FastLauncher  # noqa: E402

TENSORS, INTS = 12, 24


@triton.jit
def _touch(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11,
           i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, i12, i13, i14, i15, i16, i17, i18, i19, i20, i21,
           i22, i23, f0, f1, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = (i0 + i1 + i2 + i3 + i4 + i5 + i6 + i7 + i8 + i9 + i10 + i11 + i12 + i13 + i14 + i15 + i16 + i17 + i18
         + i19 + i20 + i21 + i22 + i23).to(tl.float32) * f0 + f1
    if FLAG:
        v += 1.0
    tl.store(p0 + offs, v + tl.load(p1 + offs) + tl.load(p11 + offs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--launches", type=int, default=2000)
    args = parser.parse_args()
    tensors = [torch.randn(256, device="cuda") for _ in range(TENSORS)]
    ints = [17 + 3 * i for i in range(INTS)]  # neither 1 nor divisible by 16: every one is a runtime argument
    call = (*tensors, *ints, 0.5, 0.25)
    consts = {"BLOCK": 256, "FLAG": True}
    grid = (1,)
    fast = FastLauncher(_touch)
    fast(grid, *call, **consts)  # compiles, caches
    kernel, tail = next(iter(fast.cache.values()))  # the compiled kernel and its constexpr tail (BLOCK, FLAG)

    def triton_run_with_tensors() -> None:
        stream = driver.active.get_current_stream(0)
        full = (*call, *tail)
        kernel.run(1, 1, 1, stream, kernel.function, kernel.packed_metadata,
                   kernel.launch_metadata(grid, stream, *full), knobs.runtime.launch_enter_hook,
                   knobs.runtime.launch_exit_hook, *full)

    compiled_key = launch._args_key
    paths = {  # name -> (launch, FastLauncher's key function while it runs)
        "kernel[grid]": (lambda: _touch[grid](*call, **consts), compiled_key),
        "launcher_tensors_and_metadata": (triton_run_with_tensors, compiled_key),
        "fast_launcher_python_key": (lambda: fast(grid, *call, **consts), launch._python_args_key),
        "fast_launcher": (lambda: fast(grid, *call, **consts), compiled_key),
    }
    want = None
    for name, (fn, key) in paths.items():  # each path computes the same value
        launch._args_key = key
        tensors[0].fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        want = tensors[0].clone() if want is None else want
        torch.testing.assert_close(tensors[0], want, rtol=0, atol=0)

    def batch(fn, key):
        def run() -> None:
            launch._args_key = key
            for _ in range(args.launches):
                fn()
            torch.cuda.synchronize()
        return run

    rows = {}
    for _ in range(2):  # two rounds, interleaved, so drift on the host shows as a spread
        for name, (fn, key) in paths.items():
            ms = host_times(batch(fn, key), 5, warmup=1)
            rows.setdefault(name, []).extend(t / args.launches * 1e3 for t in ms)
    launch._args_key = compiled_key
    result = {**environment(), "compiled_key": compiled_key is not launch._python_args_key,
              "arguments": {"tensors": TENSORS, "ints": INTS, "floats": 2, "constexprs": 2},
              "launches_per_batch": args.launches,
              "us_per_launch": {n: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                                for n, v in rows.items()}}
    base = result["us_per_launch"]["launcher_tensors_and_metadata"]["median"]
    print(f"{'path':32s} {'us/launch':>10s} {'min':>7s} {'max':>7s}")
    for n, r in result["us_per_launch"].items():
        print(f"{n:32s} {r['median']:10.2f} {r['min']:7.2f} {r['max']:7.2f}")
    us = {n: r["median"] for n, r in result["us_per_launch"].items()}
    result["fast_launcher_vs_tensors_and_metadata"] = us["fast_launcher"] / base
    result["fast_launcher_vs_python_key"] = us["fast_launcher"] / us["fast_launcher_python_key"]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"launch_overhead_{card_slug(result['card'])}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("launch_overhead.py needs a CUDA GPU")
    main()
