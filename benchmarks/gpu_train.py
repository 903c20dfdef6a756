"""GPU training benchmark: one training step of hmedn_3d_l2 at 1x4x128^3 in eager fp32, eager bf16 and the
trainer's lean mode, against MONAI DynUNet (bf16) in the same run, and the largest trainable cube under an 8 GiB
cap. (The 2-GPU DDP comparison is benchmarks/gpu_ddp.py.)

    python benchmarks/gpu_train.py --out DIR [--iters 10] [--norm-ab] [--part all|steps|cubes] [--tag TAG]

(On an H100 host all of it takes ~8 minutes: ``--part steps`` and ``--part cubes`` split it into two records.)

A step = forward (under autocast for bf16) + loss + backward + AdamW step, on a fixed random batch. hmedn_3d_l2
uses the trainer's loss, :class:`hmedn_fast.losses.HMEDNLoss` (weight and contour targets made from the labels
inside the step by the fast targets op, difficulty-guided CE + contour term + deep supervision, fused kernel on
CUDA). ``lean_graph`` = the trainer's CUDA defaults: bf16 autocast, channels-last weights and batches, activation
checkpointing level ``"lean"`` (memory-lean HR pathway blocks, :mod:`hmedn_fast.train.memory`), the step replayed
from a CUDA graph; ``lean`` is the same without the graph, ``"blocks"`` (convolutions recomputed too) and
``"stages"`` (the first stage recomputed too) are reported beside it. DynUNet is MONAI's nnU-Net network for 128^3 (kernels 3, strides 1-2-2-2-2-2, filters 32..320, instance norm, no deep
supervision) with plain cross-entropy, bf16 autocast, in the contiguous layout (as MONAI runs it) and
channels-last. ``*_cl`` = channels-last (``torch.channels_last_3d``) model and input; ``compiled_bf16_cl`` =
``hmedn train --compile`` (``torch.compile`` of the model, timed after its compiling first steps); ``*_graph`` =
``hmedn train --cuda-graph`` (the whole step captured in a CUDA graph after two eager steps and replayed:
:class:`hmedn_fast.train.graphed.GraphedStep`), for DynUNet too. Every setting uses the trainer's optimizer: fused
AdamW with the learning rate as a device tensor.

Times: CUDA events around each step after warm-up (p50 and mean ms). Peak memory: torch.cuda.max_memory_allocated
over the timed steps (parameters, gradients, AdamW state and activations; for CUDA-graph settings over all steps,
as the graph's memory is allocated at capture). Largest cube: under
``torch.cuda.set_per_process_memory_fraction(8 GiB / total)``, the largest multiple of 16 in 64..256 for which
two steps at batch 1 run without an out-of-memory error (binary search; monotone in the size).
Writes DIR/train_<card>.json and a PNG of it, and prints a table (``--plot RECORD.json`` redraws a PNG).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmedn_fast.losses import HMEDNLoss  # noqa: E402
from hmedn_fast.models import create_model  # noqa: E402
from hmedn_fast.train.graphed import WARMUP, GraphedStep  # noqa: E402
from hmedn_fast.train.memory import LEVELS, set_checkpointing  # noqa: E402
from timing import cuda_kernel_times, cuda_times  # noqa: E402
from record import card_slug, environment  # noqa: E402

CAP_BYTES = 8 * 2**30
NO_CUBE_SEARCH = ("eager_bf16_cl", "compiled_bf16_cl", "dynunet_bf16_cl",  # steps timed, no cube search (time)
                  "lean_graph", "dynunet_bf16_graph", "eager_bf16_cl_graph", "lean_blocks_graph",
                  "lean_stages_graph")
SIZES = list(range(64, 257, 16))
CL = torch.channels_last_3d
CONFIGS = {  # name: (model, autocast dtype, checkpointing level, memory format, torch.compile, CUDA graph)
    "eager_fp32": ("hmedn_3d_l2", None, "none", torch.contiguous_format, False, False),
    "eager_bf16": ("hmedn_3d_l2", torch.bfloat16, "none", torch.contiguous_format, False, False),
    "eager_bf16_cl": ("hmedn_3d_l2", torch.bfloat16, "none", CL, False, False),
    "compiled_bf16_cl": ("hmedn_3d_l2", torch.bfloat16, "none", CL, True, False),
    "lean": ("hmedn_3d_l2", torch.bfloat16, "lean", CL, False, False),
    "lean_graph": ("hmedn_3d_l2", torch.bfloat16, "lean", CL, False, True),
    "eager_bf16_cl_graph": ("hmedn_3d_l2", torch.bfloat16, "none", CL, False, True),
    "lean_blocks": ("hmedn_3d_l2", torch.bfloat16, "blocks", CL, False, False),
    "lean_blocks_graph": ("hmedn_3d_l2", torch.bfloat16, "blocks", CL, False, True),
    "lean_stages": ("hmedn_3d_l2", torch.bfloat16, "stages", CL, False, False),
    "lean_stages_graph": ("hmedn_3d_l2", torch.bfloat16, "stages", CL, False, True),
    "dynunet_bf16": ("dynunet", torch.bfloat16, None, torch.contiguous_format, False, False),
    "dynunet_bf16_cl": ("dynunet", torch.bfloat16, None, CL, False, False),
    "dynunet_bf16_graph": ("dynunet", torch.bfloat16, None, torch.contiguous_format, False, True),
}


def dynunet() -> torch.nn.Module:
    from monai.networks.nets import DynUNet

    strides = [1, 2, 2, 2, 2, 2]
    return DynUNet(3, 4, 4, kernel_size=[3] * 6, strides=strides, upsample_kernel_size=strides[1:],
                   norm_name="instance", deep_supervision=False)


def make_step(config: str, size: int, batch: int = 1, seed: int = 0) -> Callable[[], float]:
    """A closure running one training step of ``config`` on a fixed random (batch, 4, size^3) batch."""
    name, dtype, level, fmt, compiled, graphed = CONFIGS[config]
    torch.manual_seed(seed)
    model = (dynunet() if name == "dynunet" else create_model(name)).to("cuda", memory_format=fmt).train()
    if level is not None:
        set_checkpointing(model, level)
    if compiled:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-4, device="cuda"), weight_decay=1e-7, fused=True,
                            capturable=graphed)
    x = torch.randn(batch, 4, size, size, size, device="cuda").contiguous(memory_format=fmt)
    y = make_labels(batch, size)
    loss_fn = HMEDNLoss(4, check_values=False).cuda() if name != "dynunet" else None

    def train(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        loss = loss_fn(out, y).total if loss_fn is not None else F.cross_entropy(out.float(), y.long())
        loss.backward()
        opt.step()
        return loss.detach()

    fn = GraphedStep(train) if graphed else train
    return lambda: fn(x, y)


def make_labels(batch: int, size: int) -> torch.Tensor:
    """Three nested blobs (labels 1-3) with random offsets: structures with boundaries, like the phantom."""
    g = torch.linspace(-1, 1, size, device="cuda")
    zz, yy, xx = torch.meshgrid(g, g, g, indexing="ij")
    labels = torch.zeros(batch, size, size, size, dtype=torch.uint8, device="cuda")
    gen = torch.Generator().manual_seed(1)
    for n in range(batch):
        for k, r in ((1, 0.7), (2, 0.45), (3, 0.2)):
            c = (torch.rand(3, generator=gen) - 0.5) * 0.3
            inside = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r * r
            labels[n][inside] = k
    return labels


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def time_steps(config: str, size: int, warmup: int, iters: int) -> dict:
    """p50 / mean ms of ``iters`` steps after ``warmup`` ones, peak memory of the timed steps (of every step for a
    CUDA-graph setting: its replays allocate nothing, the memory is the graph's pool, allocated at capture)."""
    graphed = CONFIGS[config][5]
    if graphed and warmup <= WARMUP:
        raise ValueError("a CUDA-graph setting needs more warm-up steps than GraphedStep's eager ones (the step after "
                         "them captures)")
    step = make_step(config, size)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    if not graphed:
        torch.cuda.reset_peak_memory_stats()
    losses: list[torch.Tensor] = []
    times = cuda_times(lambda: losses.append(step().clone()), iters)
    peak = torch.cuda.max_memory_allocated()
    del step
    free()
    return {"p50_ms": float(np.median(times)), "mean_ms": float(np.mean(times)), "peak_mib": peak / 2**20,
            "loss_first": float(losses[0]), "loss_last": float(losses[-1]), "first_step_s": first_s}


def fits(config: str, size: int, failures: dict) -> bool:
    """Two steps at ``size`` run without an out-of-memory error (its message goes to ``failures[size]``)."""
    try:
        step = make_step(config, size)
        step()
        step()
        torch.cuda.synchronize()
        ok = True
    except torch.OutOfMemoryError as exc:
        failures[size] = str(exc).split("\n")[0][:300]
        ok = False
    step = None  # noqa: F841 - drop the closure (model, optimizer, batch) before freeing
    free()
    return ok


def largest_cube(config: str) -> dict:
    """Binary search over SIZES under the 8 GiB cap (set by the caller). DynUNet's five stride-2 stages need
    sizes divisible by 32 (its skip concatenation fails otherwise), so it searches those only."""
    sizes = [s for s in SIZES if s % (32 if config.startswith("dynunet") else 16) == 0]
    lo, hi, tried, failures = -1, len(sizes), {}, {}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        tried[sizes[mid]] = fits(config, sizes[mid], failures)
        lo, hi = (mid, hi) if tried[sizes[mid]] else (lo, mid)
    size = sizes[lo] if lo >= 0 else None
    return {"largest_cube": size, "voxels": size**3 if size else 0, "trials": tried, "oom": failures,
            "at_search_limit": lo == len(sizes) - 1}


def smoke() -> dict:
    """Correctness before timing: fp32 gradients of every checkpointing level equal eager's (64^3; TF32 off, as
    its 10-bit mantissa alone moves fp32 gradients by ~1e-2 between two cuDNN algorithm choices), the bf16
    loss is close to the fp32 one, and 8 lean steps lower the loss on a fixed batch."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _smoke()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _smoke() -> dict:
    torch.manual_seed(0)
    model = create_model("hmedn_3d_l2", dropout=0.0).cuda().train()
    loss_fn = HMEDNLoss(4, check_values=False).cuda()
    x, y = torch.randn(1, 4, 64, 64, 64, device="cuda"), make_labels(1, 64)
    grads, losses = {}, {}
    for level in LEVELS:
        set_checkpointing(model, level)
        model.zero_grad()
        loss = loss_fn(model(x), y).total
        loss.backward()
        losses[level] = float(loss.detach())
        grads[level] = torch.cat([p.grad.flatten() for p in model.parameters()])
    rel = {lv: float((grads[lv] - grads["none"]).norm() / grads["none"].norm()) for lv in LEVELS[1:]}
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    bf16_loss = float(loss_fn(out, y).total.detach())
    step = make_step("lean", 64)
    trained = [float(step()) for _ in range(8)]
    del step, model
    free()
    return {"grad_rel_err_vs_eager_fp32": rel, "loss_fp32": losses["none"], "loss_bf16": bf16_loss,
            "lean_losses_8_steps": trained,
            "ok": all(v < 1e-3 for v in rel.values()) and abs(bf16_loss / losses["none"] - 1) < 0.05
            and trained[-1] < trained[0]}


def norm_ab(size: int, iters: int) -> dict:
    """The lean step with norm_act's automatic backend against PyTorch's BatchNorm everywhere
    (``HMEDN_BACKEND_NORM_ACT=reference``) and against other Triton size thresholds, interleaved in one process:
    p50 ms per round and GPU kernel ms (one profiled step)."""
    import hmedn_fast.ops.norm_act as na

    step, default = make_step("lean", size), na.TRITON_MIN_ELEMENTS
    variants = {"auto": ({}, default), "reference": ({"HMEDN_BACKEND_NORM_ACT": "reference"}, default),
                "threshold_2^24": ({}, 2**24), "threshold_2^20": ({}, 2**20)}
    out: dict = {name: {"p50_ms": []} for name in variants}
    try:
        for round_ in range(2):
            for name, (env, threshold) in variants.items():
                os.environ.pop("HMEDN_BACKEND_NORM_ACT", None)
                os.environ.update(env)
                na.TRITON_MIN_ELEMENTS = threshold
                out[name]["p50_ms"].append(float(np.median(cuda_times(step, iters, warmup=2))))
                if round_ == 1:
                    out[name]["gpu_kernel_ms"] = profile_callable(step)["gpu_ms"]
    finally:
        os.environ.pop("HMEDN_BACKEND_NORM_ACT", None)
        na.TRITON_MIN_ELEMENTS = default
    del step
    free()
    return out


def profile_callable(step: Callable[[], object], top: int = 20) -> dict:
    """CUDA time of one profiled ``step()`` by kernel (the ``top`` largest) and in total."""
    rows = cuda_kernel_times(step, warmup=0)
    return {"gpu_ms": 1e3 * sum(s for _, s, _ in rows), "kernels": [
        {"name": name[:120], "ms": 1e3 * s, "calls": int(n)} for name, s, n in rows[:top]]}


def profile_step(config: str, size: int, top: int = 20) -> dict:
    """:func:`profile_callable` of a warmed-up step of ``config``."""
    step = make_step(config, size)
    for _ in range(3):
        step()
    result = profile_callable(step, top)
    del step
    free()
    return result


def plot(result: dict, path: Path) -> None:
    """PNG of a record: step time and peak memory per setting (bars), the largest cube under 8 GiB as labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["step"])
    cubes = result.get("largest_cube_8gib", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6), sharey=True)
    for ax, key, label in ((axes[0], "p50_ms", "step time (ms, p50)"), (axes[1], "peak_mib", "peak memory (MiB)")):
        values = [result["step"][n][key] for n in names]
        colors = ["tab:gray" if n.startswith("dynunet") else "tab:blue" for n in names]
        ax.barh(names, values, color=colors)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
        ax.set_xlabel(label)
    axes[0].invert_yaxis()  # shared: the first setting on top
    for i, n in enumerate(names):
        if n in cubes and cubes[n]["largest_cube"]:
            axes[1].text(0, i, f"  cube {cubes[n]['largest_cube']}", va="center", fontsize=8, color="white")
    fig.suptitle(f"hmedn_3d_l2 training step, 1x4x128^3, {result['card']} ({result['date'][:10]}); "
                 f"gray: MONAI DynUNet", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="a subset of the settings (the voxel target needs lean and eager_fp32 in the cube part)")
    parser.add_argument("--tag", default="", help="suffix of the JSON name (train_<card>_<tag>.json; default: the "
                                                  "part, unless all)")
    parser.add_argument("--part", choices=("all", "steps", "cubes"), default="all",
                        help="steps: smoke check, step times and the lean profile; cubes: the largest cubes under "
                             "8 GiB (all of it takes ~8 min on an H100 host: two calls fit a 10-minute limit)")
    parser.add_argument("--plot", type=Path, help="only draw the PNG of an existing record (next to it)")
    parser.add_argument("--norm-ab", action="store_true",
                        help="also the norm_act backend / threshold A/B of the lean step (norm_act_ab; ~2 min more)")
    args = parser.parse_args()
    if args.plot is not None:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_train.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name()
    configs = {name: CONFIGS[name] for name in args.configs}
    try:
        import monai
        monai_version = monai.__version__
    except ImportError as exc:
        monai_version = None
        configs = {k: v for k, v in configs.items() if v[0] != "dynunet"}
        print(f"MONAI DynUNet baseline skipped: {exc}", flush=True)
    result = {**environment(), "monai": monai_version, "shape": [1, 4, 128, 128, 128], "cap_gib": CAP_BYTES / 2**30,
              "configs": list(configs)}
    slug = card_slug(card)
    tag = args.tag or ("" if args.part == "all" else args.part)  # the two parts never overwrite each other
    path = args.out / f"train_{slug}{'_' + tag if tag else ''}.json"
    result["part"] = args.part
    steps = result["step"] = {}
    cubes = result["largest_cube_8gib"] = {}
    if args.part != "cubes":
        result["smoke"] = smoke()
        print("smoke:", json.dumps(result["smoke"]), flush=True)
        for name in configs:
            steps[name] = time_steps(name, 128, args.warmup, args.iters)
            r = steps[name]
            print(f"{name:14s} step p50 {r['p50_ms']:8.1f} ms  mean {r['mean_ms']:8.1f} ms  peak "
                  f"{r['peak_mib']:8.0f} MiB", flush=True)
            path.write_text(json.dumps(result, indent=1))  # partial record, completed below

    if args.part != "steps":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(CAP_BYTES / total)
        for name in [c for c in configs if c not in NO_CUBE_SEARCH]:
            cubes[name] = largest_cube(name)
            print(f"{name:14s} largest cube under 8 GiB: {cubes[name]['largest_cube']}", flush=True)
            path.write_text(json.dumps(result, indent=1))
        torch.cuda.set_per_process_memory_fraction(1.0)

    targets = {}
    if "lean" in cubes and "eager_fp32" in cubes:
        targets["lean_voxels_vs_eager_fp32"] = cubes["lean"]["voxels"] / max(cubes["eager_fp32"]["voxels"], 1)
    for ours in ("lean", "lean_graph", "lean_blocks_graph", "lean_stages_graph"):
        for base in ("dynunet_bf16", "dynunet_bf16_cl", "dynunet_bf16_graph"):
            if ours in steps and base in steps:
                targets[f"{ours}_speedup_vs_{base}"] = steps[base]["p50_ms"] / steps[ours]["p50_ms"]
                targets[f"{ours}_peak_fraction_of_{base}"] = steps[ours]["peak_mib"] / steps[base]["peak_mib"]
    result["targets"] = targets
    if args.part != "cubes":
        result["profile_lean"] = profile_step("lean", 128)
        path.write_text(json.dumps(result, indent=1))
        if args.norm_ab:
            result["norm_act_ab"] = norm_ab(128, args.iters)
            print("norm_act A/B (lean step):", json.dumps(result["norm_act_ab"]), flush=True)
        print(f"lean step profile: {result['profile_lean']['gpu_ms']:.1f} ms of GPU kernels; largest:", flush=True)
        for k in result["profile_lean"]["kernels"][:12]:
            print(f"  {k['ms']:8.2f} ms {k['calls']:5d}x  {k['name'][:90]}", flush=True)
    print("targets:", json.dumps(targets), flush=True)
    path.write_text(json.dumps(result, indent=1))
    if steps:
        plot(result, path.with_suffix(".png"))
    print("wrote", path, *(["and", path.with_suffix(".png")] if steps else []))


if __name__ == "__main__":
    main()
