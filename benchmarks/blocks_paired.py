"""Interleaved timing of issue 6's comparison: one 3D pathway step (HMEDN-3D-L2's HR pathway, ``gpu_blocks`` case
``3d_l2``) in the best eager setting (bf16 autocast + channels-last, un-graphed) against ours lean / middle / blocks
replayed from CUDA graphs, in rounds within one process.

The eager step is partly host-bound, and its time moves between processes and within one (11.2-15.1 ms on one H200
the same day, ``docs/decisions/blocks.md`` stop 34), so single timings of each implementation one after the other
make the ratio depend on when each ran. Here every round times one synchronised batch of ``--steps`` steps of every
implementation, starting one implementation later than the round before; the record keeps each round's wall ms per
step, their median and p25 / p75, the speed-ups as the median of the per-round ratios, and each step's own peak
memory (``gpu_blocks.step_peak``: the process's peak less what other implementations left allocated).

    python benchmarks/blocks_paired.py --out DIR [--rounds 15] [--steps 20]

Writes ``blocks_paired_<card>.json`` into ``--out`` and prints a table. CUDA only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_blocks  # noqa: E402
from record import card_slug, environment  # noqa: E402

from hmedn_fast.train.graphed import GraphedStep  # noqa: E402

MODES = ("lean", "middle", "blocks")
WARMUP = 3  # eager steps of each module before its peak is measured


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(p25, median, p75) of ``values``."""
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def implementations(case: dict, x, gf, gl) -> tuple[dict, dict]:
    """name -> step callable (eager, and each mode's warmed-up captured graph), and name -> step peak GiB. Each
    module first runs eager steps outside the peak's window: a process's first calls of a shape search
    (``cudnn.benchmark``'s algorithms, :mod:`hmedn_fast.ops.measured`'s backends) with workspaces and outputs that
    later steps never hold."""
    fmt = torch.channels_last_3d
    eager = gpu_blocks.build(case, "cuda").to(memory_format=fmt)
    steps = {"eager_bf16_cl": lambda: gpu_blocks.step(eager, x, gf, gl, True)}
    for _ in range(WARMUP):
        steps["eager_bf16_cl"]()
    peak, before = gpu_blocks.peak_gib(steps["eager_bf16_cl"], "cuda")
    peaks = {"eager_bf16_cl": gpu_blocks.step_peak(peak, before, gpu_blocks.resident_gib(eager, x, gf, gl))}
    for mode in MODES:
        module = gpu_blocks.build(case, "cuda", mode).to(memory_format=fmt)
        for _ in range(WARMUP):
            gpu_blocks.step(module, x, gf, gl, True)
        graphed = GraphedStep(lambda a, b, c, m=module: gpu_blocks.step(m, a, b, c, True), static_inputs=True)

        def capture(g=graphed) -> None:
            for _ in range(g.warmup + 1):
                g(x, gf, gl)

        peak, before = gpu_blocks.peak_gib(capture, "cuda")
        peaks[f"ours_{mode}_graph"] = gpu_blocks.step_peak(peak, before, gpu_blocks.resident_gib(module, x, gf, gl))
        steps[f"ours_{mode}_graph"] = lambda g=graphed: g(x, gf, gl)
    return steps, peaks


def interleaved(steps: dict, rounds: int, per_batch: int) -> dict[str, list[float]]:
    """Wall ms per step of each implementation in each round (one synchronised batch each, order rotated)."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for fn in steps.values():  # warm: the first calls of a process pick kernels and allocate
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(per_batch):
                steps[name]()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) / per_batch * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.rounds < 2 or args.steps < 1:
        parser.error("--rounds must be >= 2 and --steps >= 1")
    if not torch.cuda.is_available():
        sys.exit("blocks_paired.py needs a CUDA GPU (the graphed steps and the memory figures are CUDA's)")
    torch.backends.cudnn.benchmark = True  # as gpu_blocks: cuDNN's and our kernels' measured choices
    case = gpu_blocks.CASES["3d_l2"]
    x, gf, gl = gpu_blocks.make_inputs(case, "cuda")
    steps, peaks = implementations(case, x, gf, gl)
    times = interleaved(steps, args.rounds, args.steps)
    eager = times["eager_bf16_cl"]
    rows = {}
    for name, ms in times.items():
        p25, med, p75 = quartiles(ms)
        rows[name] = dict(ms_rounds=ms, ms_median=med, ms_p25=p25, ms_p75=p75, step_peak_gib=peaks[name],
                          speedup_vs_eager_paired=statistics.median(e / m for e, m in zip(eager, ms)),
                          memory_vs_eager=peaks[name] / peaks["eager_bf16_cl"])
    report = dict(environment(), case=case, rounds=args.rounds, steps_per_batch=args.steps, rows=rows)
    print(f"{'impl':24s} {'ms median':>10s} {'p25':>7s} {'p75':>7s} {'step GiB':>9s} {'speedup':>8s} {'memory':>7s}")
    for name, r in rows.items():
        print(f"{name:24s} {r['ms_median']:10.2f} {r['ms_p25']:7.2f} {r['ms_p75']:7.2f} {r['step_peak_gib']:9.3f} "
              f"{r['speedup_vs_eager_paired']:8.2f} {r['memory_vs_eager']:7.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"blocks_paired_{card_slug(report['card'])}.json"
    path.write_text(json.dumps(report, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
