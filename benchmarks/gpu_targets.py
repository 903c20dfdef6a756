"""GPU benchmark of the training targets (contour + weight maps, issue 4).

    python benchmarks/gpu_targets.py --out benchmarks/results      # check, time, write targets_<card>.json
    python benchmarks/gpu_targets.py --table benchmarks/results/targets_<card>.json   # markdown table

Checks the CUDA results against the PyTorch reference and scipy (float64) first, then times, per workload:
scipy.ndimage (one core, SPEC definition per class), the PyTorch reference on CPU (all threads) and GPU, the
C++ CPU kernels with 1 thread and all threads, the CUDA kernels, and the floor = (label bytes read + map
bytes written) / device-to-device copy bandwidth measured in the same run. Times are medians; "per sample"
divides a batched call by the batch size (scipy is timed on one sample).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import scipy
import torch
from scipy import ndimage as ndi

from hmedn_fast.ops import targets_ext
from hmedn_fast.ops.reference import targets as reference
from timing import cuda_kernel_times, cuda_times, host_times
from record import card_slug, environment

SIGMA_CONTOUR, SIGMA_WEIGHT, MU0, MU = 2.0, 8.0, 1.0, 25.0
# name -> (batch, spatial shape, num_classes)
WORKLOADS = {"3d": (2, (128, 128, 128), 3), "2d": (10, (208, 144), 4)}


def make_labels(workload: str, dtype: torch.dtype = torch.int64, seed: int = 0) -> torch.Tensor:
    """Overlapping random ellipsoids (ellipses in 2D) of classes 1..K-1 on background, (N, *spatial)."""
    batch, shape, num_classes = WORKLOADS[workload]
    gen = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    labels = torch.zeros((batch, *shape), dtype=dtype)
    for n in range(batch):
        for k in range(1, num_classes):
            size = torch.tensor(shape, dtype=torch.float32)
            center = size * (0.25 + 0.5 * torch.rand(len(shape), generator=gen))
            radii = size * (0.1 + 0.2 * torch.rand(len(shape), generator=gen))
            inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii)) <= 1
            labels[n][inside] = k
    return labels


def scipy_targets(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC section 2 with scipy.ndimage in float64 for one sample (the per-class way, K - 1 + 1 filters)."""
    structure = ndi.generate_binary_structure(labels.ndim, 1)
    boundaries = []
    for k in range(1, num_classes):
        mask = labels == k
        boundaries.append(mask ^ ndi.binary_erosion(mask, structure=structure, border_value=1))
    smooth = lambda x, s: ndi.gaussian_filter(x.astype(np.float64), s, mode="reflect", truncate=4.0)  # noqa: E731
    g = smooth(np.any(boundaries, axis=0), SIGMA_CONTOUR)
    contour = g / g.max() if g.max() > 0 else np.zeros_like(g)
    s = [smooth(b, SIGMA_WEIGHT) for b in boundaries]
    total = np.sum(s, axis=0)
    weight = MU0 + MU * total / total.max() if total.max() > 0 else np.full_like(g, MU0)
    return contour, weight


def ext_targets(labels: torch.Tensor, check_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    num_classes = WORKLOADS["3d" if labels.ndim == 4 else "2d"][2]
    mu = [MU] * (num_classes - 1)
    return targets_ext.make_targets(labels, num_classes, SIGMA_CONTOUR, SIGMA_WEIGHT, MU0, mu, check_labels)


def ref_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_classes = WORKLOADS["3d" if labels.ndim == 4 else "2d"][2]
    return reference.make_targets(labels, num_classes, SIGMA_CONTOUR, SIGMA_WEIGHT, MU0, [MU] * (num_classes - 1))


def max_error(got: tuple[torch.Tensor, torch.Tensor], want) -> float:
    """Largest error of contour and of the normalised weight (W - mu0) / mu, in float64."""
    c, w = (torch.as_tensor(x).double().cpu() for x in got)
    rc, rw = (torch.as_tensor(x).double().cpu() for x in want)
    return max((c - rc).abs().max().item(), ((w - rw) / MU).abs().max().item())


def time_cpu(fn: Callable[[], object], reps: int) -> float:
    return statistics.median(host_times(fn, reps, warmup=1))


def time_cuda(fn: Callable[[], object], reps: int = 50) -> float:
    return statistics.median(cuda_times(fn, reps, warmup=5))


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s)."""
    x = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda").uniform_()
    y = torch.empty_like(x)
    ms = time_cuda(lambda: y.copy_(x), reps=20)
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def with_threads(n: int, fn: Callable[[], float]) -> float:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def check(workload: str) -> dict:
    labels = make_labels(workload).cuda()
    errors = {}
    for mu_kind, dtype in [("uniform mu", torch.int64), ("uniform mu, uint8", torch.uint8)]:
        got = ext_targets(labels.to(dtype), check_labels=True)
        errors[f"cuda vs reference (gpu), {mu_kind}"] = max_error(got, ref_targets(labels))
    num_classes = WORKLOADS[workload][2]
    mu = [MU * (k + 1) / num_classes for k in range(num_classes - 1)]  # per-class weights: 3-field path
    got = targets_ext.make_targets(labels, num_classes, SIGMA_CONTOUR, SIGMA_WEIGHT, MU0, mu)
    want = reference.make_targets(labels, num_classes, SIGMA_CONTOUR, SIGMA_WEIGHT, MU0, mu)
    errors["cuda vs reference (gpu), per-class mu"] = max_error(got, want)
    got = ext_targets(labels)
    errors["cuda vs scipy float64, sample 0"] = max_error(
        (got[0][0], got[1][0]), scipy_targets(labels[0].cpu().numpy(), num_classes)
    )
    return errors


def bench(workload: str, copy_gbs: float) -> dict:
    batch, shape, num_classes = WORKLOADS[workload]
    labels = make_labels(workload)
    gpu = labels.cuda()
    voxels = labels.numel()
    big = workload == "3d"
    all_threads = os.cpu_count() or 1
    rows = {}
    one = labels[0].numpy()
    rows["scipy.ndimage (1 core)"] = (time_cpu(lambda: scipy_targets(one, num_classes), 1 if big else 5), 1)
    rows[f"reference torch CPU ({all_threads} threads)"] = (
        with_threads(all_threads, lambda: time_cpu(lambda: ref_targets(labels), 2 if big else 5)), batch)
    rows["reference torch GPU"] = (time_cuda(lambda: ref_targets(gpu), 10 if big else 30), batch)
    rows["C++ CPU (1 thread)"] = (with_threads(1, lambda: time_cpu(lambda: ext_targets(labels), 3 if big else 10)),
                                  batch)
    rows[f"C++ CPU ({all_threads} threads)"] = (
        with_threads(all_threads, lambda: time_cpu(lambda: ext_targets(labels), 5 if big else 20)), batch)
    rows["CUDA"] = (time_cuda(lambda: ext_targets(gpu)), batch)
    rows["CUDA, uint8 labels"] = (time_cuda(lambda: ext_targets(gpu.to(torch.uint8))), batch)
    rows["CUDA, label check (1 sync)"] = (time_cuda(lambda: ext_targets(gpu, check_labels=True)), batch)
    dense = dense_labels(workload).cuda()  # worst case for the kernels' zero-skipping
    rows["CUDA, i.i.d. random labels (no sparsity)"] = (time_cuda(lambda: ext_targets(dense)), batch)
    floor_bytes = voxels * (labels.element_size() + 2 * 4)
    floor_ms = floor_bytes / (copy_gbs * 1e9) * 1e3
    scipy_per_sample = rows["scipy.ndimage (1 core)"][0]
    table = []
    for name, (ms, per) in rows.items():
        per_sample = ms / per
        table.append({"backend": name, "ms_per_call": ms, "samples_per_call": per, "ms_per_sample": per_sample,
                      "speedup_vs_scipy": scipy_per_sample / per_sample,
                      "x_floor": ms / floor_ms if per == batch else None})
    return {"batch": batch, "shape": list(shape), "num_classes": num_classes, "label_dtype": "int64",
            "floor_bytes": floor_bytes, "floor_ms": floor_ms, "rows": table,
            "boundary_fraction": boundary_fraction(gpu, num_classes),
            "cuda_kernels_us": kernel_breakdown(lambda: ext_targets(gpu))}


def dense_labels(workload: str, seed: int = 1) -> torch.Tensor:
    """I.i.d. uniform labels: almost every voxel is a boundary voxel, nothing for the kernels to skip."""
    batch, shape, num_classes = WORKLOADS[workload]
    return torch.randint(0, num_classes, (batch, *shape), generator=torch.Generator().manual_seed(seed))


def boundary_fraction(labels: torch.Tensor, num_classes: int) -> float:
    return targets_ext.boundary_map(labels, num_classes).any(dim=1).float().mean().item()


def kernel_breakdown(fn: Callable[[], object], reps: int = 10) -> dict[str, float]:
    """Mean GPU time per call of each kernel (torch.profiler), microseconds."""
    return {name[:80]: seconds * 1e6 for name, seconds, _ in cuda_kernel_times(fn, reps)}


def markdown(result: dict) -> str:
    lines = [f"Targets benchmark on {result['card']} (torch {result['torch']}, CUDA {result['cuda']}, "
             f"{result['date']}); floor = (labels read + 2 float32 maps written) / copy bandwidth "
             f"{result['copy_gbs']:.0f} GB/s."]
    for name, w in result["workloads"].items():
        shape = "x".join(str(s) for s in w["shape"])
        lines += ["", f"**{name}**: batch {w['batch']} x {shape}, {w['num_classes']} classes, "
                      f"int64 labels; floor {w['floor_ms'] * 1e3:.1f} us per batch", "",
                  "| backend | ms / call | ms / sample | vs scipy | x floor |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in w["rows"]:
            floor = f"{r['x_floor']:.1f}" if r["x_floor"] is not None else "-"
            lines.append(f"| {r['backend']} | {r['ms_per_call']:.3f} | {r['ms_per_sample']:.4f} | "
                         f"{r['speedup_vs_scipy']:.0f}x | {floor} |")
    lines += ["", "Max errors (fp32 vs reference / scipy float64; weight on its (W - mu0) / mu scale): "
              + "; ".join(f"{name} {k}: {v:.1e}" for name, w in result["checks"].items() for k, v in w.items())]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="folder for targets_<card>.json")
    group.add_argument("--table", type=Path, help="print the markdown table of a results JSON")
    args = parser.parse_args()
    if args.table is not None:
        print(markdown(json.loads(args.table.read_text())))
        return 0
    for backend in ("cpu", "cuda"):
        if backend == "cuda" and not torch.cuda.is_available():
            print("cannot run: no CUDA device", file=sys.stderr)
            return 2
        reason = targets_ext.unavailable(backend, torch.zeros(1, 1, 1, dtype=torch.long, device=backend))
        if reason is not None:
            print(f"cannot run: {backend} backend unavailable: {reason}", file=sys.stderr)
            return 2
    checks = {w: check(w) for w in WORKLOADS}
    bad = {w: {k: v for k, v in c.items() if not v <= 1e-5} for w, c in checks.items()}
    if any(bad.values()):
        print(f"CUDA results differ from the references by more than 1e-5: {bad}", file=sys.stderr)
        return 1
    copy_gbs = copy_bandwidth_gbs()
    card = torch.cuda.get_device_name()
    result = {
        **environment(), "scipy": scipy.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_threads": os.cpu_count(),
        "copy_gbs": copy_gbs, "checks": checks, "workloads": {w: bench(w, copy_gbs) for w in WORKLOADS},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"targets_{card_slug(card)}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
