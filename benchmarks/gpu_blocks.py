"""GPU benchmark of the HR pathway (issue 6): correctness first, then forward+backward time, peak memory and
TFLOP/s of every implementation in the same run, the dense-fusion variants, the fused norm kernels against
their bandwidth floor, and a cuDNN sweep of the pathway's dilated convolutions.

    python benchmarks/gpu_blocks.py --out DIR [--no-compile] [--smoke]

Cases: ``3d_l2``: HR pathway of HMEDN-3D-L2 (9 blocks (2, 4), L=32, input 32 channels at 64^3, batch 1);
``2d_l3``: HR pathway of HRDN-L3 (L=56 at 1/4 of 144x208 = 36x52, input 128 channels, batch 10).
Implementations: eager fp32; eager bf16 autocast + channels-last; torch.compile of the latter; the latter with
torch.utils.checkpoint per block; ours (``checkpoint="lean"`` / ``"middle"`` / ``"blocks"`` / ``"auto"``, Triton norm + ReLU,
bf16 + channels-last; the dense fusion as an in-loop sum of 1x1 convs, and ``ours_lean_cat`` with one 1x1 conv
over the concatenation) and ours in fp32 (for the 1e-4 check); on CUDA also eager bf16 + channels-last and ours
lean / middle / blocks / lean_cat replayed from CUDA graphs (``*_graph``: GPU time without the host's per-kernel launch
cost), and ours lean as a partial-network graph inside the eager step (``*_partial_graph``:
``torch.cuda.make_graphed_callables``). TFLOP/s = FLOPs of one eager fp32 step counted
by ``torch.utils.flop_counter`` / time (recomputation is not counted: "useful" FLOP/s).
Peak memory (CUDA): ``peak_gib`` is the process's peak during a row's step, which includes what earlier rows left
allocated (other implementations' modules, the correctness check's results, cached workspaces: ``allocated_before_gib``
less the step's own); ``step_peak_gib`` subtracts that (the step's own peak: its inputs, its module's parameters and
gradients, activations, workspaces) and ``step_memory_vs_best_eager`` compares those.
Writes ``blocks_<card>.json`` into ``--out`` and prints tables. ``--smoke`` runs tiny shapes (CPU allowed).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hmedn_fast.nn import HRPathway  # noqa: E402
from hmedn_fast.ops import measured  # noqa: E402
from hmedn_fast.ops.norm_act import norm_act  # noqa: E402
from hmedn_fast.train.graphed import GraphedStep  # noqa: E402
from timing import cuda_kernel_times, cuda_times, host_times  # noqa: E402
from record import card_slug, environment  # noqa: E402

CASES = {
    "3d_l2": dict(spatial_dims=3, in_channels=32, channels=32, batch=1, size=(64, 64, 64)),
    "2d_l3": dict(spatial_dims=2, in_channels=128, channels=56, batch=10, size=(36, 52)),
}
SMOKE = {
    "3d_l2": dict(spatial_dims=3, in_channels=4, channels=8, batch=1, size=(8, 10, 12)),
    "2d_l3": dict(spatial_dims=2, in_channels=6, channels=8, batch=2, size=(12, 16)),
}
GIB = 2 ** 30


def build(case: dict, device: str, checkpoint: str = "none") -> HRPathway:
    torch.manual_seed(0)
    path = HRPathway(case["in_channels"], case["channels"], 9, (2, 4), num_classes=4,
                     spatial_dims=case["spatial_dims"], checkpoint=checkpoint).to(device)
    with torch.no_grad():  # non-trivial affine parameters
        for m in path.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return path


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.to(memory_format=torch.channels_last if t.ndim == 4 else torch.channels_last_3d)


class TorchCheckpointed(torch.nn.Module):
    """The eager pathway with torch.utils.checkpoint around every block (the standard recipe)."""

    def __init__(self, path: HRPathway) -> None:
        super().__init__()
        self.path = path

    def forward(self, x):
        p = self.path
        y = p.proj(x)
        outs = [y]
        for block in p.blocks:
            y = torch_checkpoint(block, y, use_reentrant=False)
            outs.append(y)
        feats = p.fuse(torch.cat(outs, 1))
        return feats, p.head(feats)


def implementations(case: dict, device: str, with_compile: bool) -> dict:
    """name -> (module, bf16 autocast + channels-last?)."""
    impls = {"eager_fp32": (build(case, device), False),
             "eager_bf16_cl": (build(case, device), True),
             "eager_ckpt_bf16_cl": (TorchCheckpointed(build(case, device)), True),
             "ours_lean_fp32": (build(case, device, "lean"), False),
             "ours_blocks_fp32": (build(case, device, "blocks"), False),
             "ours_lean_bf16_cl": (build(case, device, "lean"), True),
             "ours_blocks_bf16_cl": (build(case, device, "blocks"), True),
             "ours_middle_bf16_cl": (build(case, device, "middle"), True),
             "ours_auto_bf16_cl": (build(case, device, "auto"), True)}
    concatenated = build(case, device, "lean")
    concatenated.dense_sum = False  # item 2: lean with the fusion as one 1x1 conv over the concatenation
    impls["ours_lean_cat_bf16_cl"] = (concatenated, True)
    if with_compile:
        impls["compile_bf16_cl"] = (torch.compile(build(case, device)), True)
    fmt = torch.channels_last if case["spatial_dims"] == 2 else torch.channels_last_3d
    for module, cl in impls.values():
        if cl:
            module.to(memory_format=fmt)
    return impls


def unwrap(module) -> torch.nn.Module:
    """The HRPathway inside a torch.compile / checkpoint wrapper."""
    module = getattr(module, "_orig_mod", module)
    return module.path if isinstance(module, TorchCheckpointed) else module


def make_inputs(case: dict, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (case["batch"], case["in_channels"], *case["size"])
    x = torch.randn(shape, generator=g).to(device)
    gf = torch.randn((case["batch"], case["channels"], *case["size"]), generator=g).to(device)
    gl = torch.randn((case["batch"], 4, *case["size"]), generator=g).to(device)
    return x, gf, gl


def step(module, x, gf, gl, bf16_cl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward + backward; returns (features, input gradient)."""
    x = (channels_last(x) if bf16_cl else x).detach().requires_grad_()
    for p in module.parameters():
        p.grad = None
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16_cl else contextlib.nullcontext()
    with ctx:
        feats, logits = module(x)
    torch.autograd.backward([feats, logits], [gf.to(feats.dtype), gl.to(logits.dtype)])
    return feats.detach(), x.grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check(impls: dict, x, gf, gl) -> dict:
    """Relative errors (max |a - b| / max |b|) of features and of input / parameter gradients (worst tensor)
    vs the eager pathway in float64, with TF32 off (else fp32 convolutions themselves differ by ~1e-3)."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return _check(impls, x, gf, gl)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _check(impls: dict, x, gf, gl) -> dict:
    eager = impls["eager_fp32"][0]
    ref_mod = copy.deepcopy(eager).double()
    ref_f, ref_gx = step(ref_mod, x.double(), gf.double(), gl.double(), False)
    ref_grads = [p.grad for p in ref_mod.parameters()]
    out = {}
    for name, (module, cl) in impls.items():
        unwrap(module).load_state_dict(eager.state_dict())
        f, gx = step(module, x, gf, gl, cl)
        grads = [rel_err(gx, ref_gx)] + [rel_err(p.grad, r) for p, r in zip(module.parameters(), ref_grads)]
        out[name] = dict(features_err=rel_err(f, ref_f), grads_err=max(grads), bf16=cl)
    judge(out)
    return out


def judge(out: dict) -> None:
    """Set ``ok`` on each row of errors against the float64 eager pathway. fp32: within 1e-4, or within 2x
    eager fp32's own error (gradients through 9 BatchNorm blocks cancel heavily). bf16: features and gradients
    within 2e-2 or within 1.5x eager bf16's own error, whichever is larger (eager bf16 itself, the reference
    module at that precision, is 2.1e-2 of the max away from float64 in its features after 9 blocks, and far
    more in some parameter gradient: BatchNorm backward removes the mean)."""
    e32, e16 = out["eager_fp32"], out["eager_bf16_cl"]
    for r in out.values():
        ref, floor, factor = (e16, 2e-2, 1.5) if r["bf16"] else (e32, 1e-4, 2.0)
        r["ok"] = bool(all(r[k] <= max(floor, factor * ref[k]) for k in ("features_err", "grads_err")))


def timed(fn, warmup: int, iters: int, device: str) -> float:
    """Median milliseconds of fn() (CUDA events on GPU)."""
    times = cuda_times(fn, iters, warmup) if device == "cuda" else host_times(fn, iters, warmup)
    return sorted(times)[len(times) // 2]


def peak_gib(fn, device: str) -> tuple[float | None, float | None]:
    """(peak allocated GiB during fn(), GiB allocated before it: parameters, inputs, other implementations)."""
    if device != "cuda":
        return None, None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB, before / GIB


def resident_gib(module, *inputs: torch.Tensor) -> float:
    """GiB of the tensors a step of ``module`` holds from before it starts: its parameters, buffers and gradients
    (the last step's, freed as the next begins) and the inputs; distinct storages counted once."""
    module = unwrap(module)
    tensors = [*module.parameters(), *module.buffers(), *inputs]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.is_cuda}
    return sum(storages.values()) / GIB


def step_peak(peak: float | None, before: float | None, resident: float) -> float | None:
    """The step's own peak: the process's peak less what was allocated before the step and is not the step's
    (other implementations' modules, the correctness check's results, cached workspaces)."""
    return None if peak is None else peak - before + resident


def count_flops(module, x, gf, gl) -> int:
    with FlopCounterMode(display=False) as counter:
        step(module, x, gf, gl, False)
    return counter.get_total_flops()


def bench_case(case: dict, device: str, with_compile: bool, warmup: int, iters: int) -> dict:
    impls = implementations(case, device, with_compile)
    x, gf, gl = make_inputs(case, device)
    flops = count_flops(impls["eager_fp32"][0], x, gf, gl)
    checks = check(impls, x, gf, gl)
    rows = {}
    for name, (module, cl) in impls.items():
        fn = lambda: step(module, x, gf, gl, cl)  # noqa: E731
        ms = timed(fn, warmup, iters, device)
        peak, before = peak_gib(fn, device)
        rows[name] = dict(ms=ms, peak_gib=peak, allocated_before_gib=before, tflops=flops / ms / 1e9,
                          step_peak_gib=step_peak(peak, before, resident_gib(module, x, gf, gl)))
        if isinstance(module, HRPathway) and module.checkpoint == "auto":
            with torch.autocast(device, dtype=torch.bfloat16):
                rows[name]["auto_mode"] = module.resolve_checkpoint(channels_last(x))
        rows[name].update(checks.get(name, {}))
    if device == "cuda":
        for name in GRAPHED:
            rows[name + "_graph"] = graphed_row(*impls[name], x, gf, gl, iters, flops)
        rows["ours_lean_bf16_cl_partial_graph"] = partial_graph_row(impls["ours_lean_bf16_cl"][0], x, gf, gl, iters,
                                                                    flops)
    best = min(("eager_bf16_cl", "eager_fp32"), key=lambda k: rows[k]["ms"])
    for name, r in rows.items():
        r["speedup_vs_best_eager"] = rows[best]["ms"] / r["ms"]
        if r["peak_gib"] is not None:
            r["memory_vs_best_eager"] = r["peak_gib"] / rows[best]["peak_gib"]
        if r.get("step_peak_gib") is not None:
            r["step_memory_vs_best_eager"] = r["step_peak_gib"] / rows[best]["step_peak_gib"]
        if name.endswith("_graph"):
            r["speedup_vs_eager_graph"] = rows["eager_bf16_cl_graph"]["ms"] / r["ms"]
    return dict(config=case, flops_fwd_bwd=flops, best_eager=best, rows=rows)


GRAPHED = ("eager_bf16_cl", "ours_lean_bf16_cl", "ours_middle_bf16_cl", "ours_blocks_bf16_cl",  # also graphed
           "ours_lean_cat_bf16_cl")  # (no host launch cost)


def graphed_row(module, cl: bool, x, gf, gl, iters: int, flops: int) -> dict:
    """The forward + backward replayed from a CUDA graph (:class:`hmedn_fast.train.graphed.GraphedStep`: eager
    warm-up steps, capture, then one replay per call): the GPU time without the host's launch cost. Peak memory
    over warm-up and capture (the graph's pool keeps the step's peak). The graph runs on the benchmark's input
    tensors themselves (``static_inputs``: every call passes the same ones), so the inputs count once in the peak,
    as in the eager rows (before stop 32 the graph's copies of x, gf and gl, 0.066 GiB for 3d_l2, counted too)."""
    fn = GraphedStep(lambda a, b, c: step(module, a, b, c, cl), static_inputs=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    resident = resident_gib(module, x, gf, gl)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(fn.warmup + 1):
        fn(x, gf, gl)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GIB
    ms = timed(lambda: fn(x, gf, gl), 2, iters, "cuda")
    return dict(ms=ms, peak_gib=peak, allocated_before_gib=before / GIB, tflops=flops / ms / 1e9, bf16=cl,
                step_peak_gib=step_peak(peak, before / GIB, resident))


def partial_graph_row(module, x, gf, gl, iters: int, flops: int) -> dict:
    """A copy of ``module`` made a partial-network CUDA graph (``torch.cuda.make_graphed_callables``, captured under
    bf16 autocast with ``cache_enabled=False``) and run by the same eager step as the others: what an eager model
    that contains the pathway gets. Peak memory includes the graphs' pool; errors vs the eager module's step."""
    made = [copy.deepcopy(module)]  # the copy's parameters count as allocated before, as the module's do

    def capture_and_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            sample = channels_last(x).detach().requires_grad_()
            made[0] = torch.cuda.make_graphed_callables(made[0], (sample,))
        made.append(step(made[0], x, gf, gl, True))

    peak, before = peak_gib(capture_and_step, "cuda")
    graphed, (feats, gx) = made
    want_feats, want_gx = step(module, x, gf, gl, True)
    ms = timed(lambda: step(graphed, x, gf, gl, True), 2, iters, "cuda")
    return dict(ms=ms, peak_gib=peak, allocated_before_gib=before, tflops=flops / ms / 1e9, bf16=True,
                features_err_vs_eager=rel_err(feats, want_feats), grads_err_vs_eager=rel_err(gx, want_gx))


def bench_norm(case: dict, device: str, warmup: int, iters: int) -> dict:
    """norm + residual + ReLU forward+backward on the pathway's block shape: Triton vs eager, vs the floor
    (bytes the fused kernels must move / measured copy bandwidth)."""
    shape = (case["batch"], case["channels"], *case["size"])
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = channels_last(torch.randn(shape, device=device, dtype=dtype)).requires_grad_()
        r = channels_last(torch.randn(shape, device=device, dtype=dtype)).requires_grad_()
        w = torch.rand(shape[1], device=device, requires_grad=True)
        b = torch.randn(shape[1], device=device, requires_grad=True)
        gy = channels_last(torch.randn(shape, device=device, dtype=dtype))
        row = {}
        for backend in ("triton", "reference"):
            if backend == "triton" and device != "cuda":
                continue

            def fn():
                y = norm_act(x, w, b, residual=r, backend=backend)
                torch.autograd.grad(y, (x, w, b, r), gy)
            row[backend + "_ms"] = timed(fn, warmup, iters, device)
        big = torch.empty(x.numel() * 4, device=device, dtype=dtype)
        copy_ms = timed(lambda: big.clone(), warmup, iters, device)
        bandwidth = 2 * big.numel() * big.element_size() / (copy_ms / 1e3)
        # fwd: read x twice, r once, write y; bwd: read dy, x, r twice each, write dx, dr
        moved = (4 + 8) * x.numel() * x.element_size()
        row["floor_ms"] = moved / bandwidth * 1e3
        row["copy_bandwidth_gbs"] = bandwidth / 1e9
        out[str(dtype).replace("torch.", "")] = row
    return out


NORM_GRID = [(1, 32, 32), (1, 32, 64), (1, 64, 64), (1, 8, 128), (1, 16, 128), (1, 32, 128), (1, 64, 128),
             (1, 128, 128)]  # (N, C, cube side): HMEDN-3D-L2's BatchNorm inputs at 128^3 windows


def norm_grid(warmup: int, iters: int) -> list[dict]:
    """Training BatchNorm + ReLU (running statistics) forward+backward, bf16 channels-last 3D, per shape: GPU
    kernel time (profiler) and wall time (CUDA events; host included) of the Triton op and of the reference
    (PyTorch, which has no channels-last 3D BatchNorm kernel: generic Welford reduction + elementwise passes),
    the floor (x read twice, y written, dy read twice, dx written; at the measured copy bandwidth) and what
    the automatic backend picks."""
    from hmedn_fast.ops.norm_act import prefers_triton

    big = torch.empty(2**28, device="cuda", dtype=torch.bfloat16)
    bandwidth = 2 * big.numel() * 2 / (timed(lambda: big.clone(), warmup, iters, "cuda") / 1e3)
    del big
    rows = []
    for n, c, side in NORM_GRID:
        x = channels_last(torch.randn(n, c, side, side, side, device="cuda", dtype=torch.bfloat16)).requires_grad_()
        w = torch.rand(c, device="cuda", requires_grad=True)
        b = torch.randn(c, device="cuda", requires_grad=True)
        rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
        gy = torch.randn_like(x)
        row = dict(shape=[n, c, side, side, side], elements=x.numel(), auto_triton=prefers_triton(x, "batch", True),
                   floor_ms=6 * x.numel() * 2 / bandwidth * 1e3)
        for backend in ("triton", "reference"):
            def fn():
                y = norm_act(x, w, b, running_mean=rm, running_var=rv, backend=backend)
                torch.autograd.grad(y, (x, w, b), gy)
            row[backend + "_wall_ms"] = timed(fn, warmup, iters, "cuda")
            row[backend + "_kernel_ms"] = 1e3 * sum(s for _, s, _ in cuda_kernel_times(fn, 3))
        rows.append(row)
        del x, gy
    return rows


def cudnn_sweep(case: dict, device: str, warmup: int, iters: int) -> list[dict]:
    """3x3(x3) conv L->L, forward + both backward passes, per dtype / layout / dilation / cudnn.benchmark."""
    rows = []
    shape = (case["batch"], case["channels"], *case["size"])
    conv = torch.nn.functional.conv2d if case["spatial_dims"] == 2 else torch.nn.functional.conv3d
    k = 3 ** case["spatial_dims"]
    flops = 3 * 2 * case["channels"] ** 2 * k * torch.Size(shape).numel() // case["channels"]
    for bench_flag in (False, True):
        torch.backends.cudnn.benchmark = bench_flag
        for dtype in (torch.float32, torch.bfloat16):
            for cl in (False, True):
                x = torch.randn(shape, device=device, dtype=dtype)
                w = torch.randn(case["channels"], case["channels"], *([3] * case["spatial_dims"]), device=device,
                                dtype=dtype) * 0.05
                if cl:
                    x, w = channels_last(x), channels_last(w)
                x.requires_grad_()
                w.requires_grad_()
                gy = torch.randn_like(x)
                for d in (1, 2, 3, 4, 5):
                    def fn():
                        y = conv(x, w, padding=d, dilation=d)
                        torch.autograd.grad(y, (x, w), gy)
                    ms = timed(fn, warmup, iters, device)
                    rows.append(dict(benchmark=bench_flag, dtype=str(dtype).replace("torch.", ""), channels_last=cl,
                                     dilation=d, ms=ms, tflops=flops / ms / 1e9))
    torch.backends.cudnn.benchmark = False
    for r in rows:
        base = next(b for b in rows if b["dilation"] == 1 and all(b[k] == r[k] for k in
                                                                     ("benchmark", "dtype", "channels_last")))
        r["slowdown_vs_d1"] = r["ms"] / base["ms"]
    return rows


def verdict(sweep: list[dict]) -> dict:
    """Is a Triton implicit-GEMM dilated conv justified? Yes when, in the best cuDNN setting (bf16,
    channels-last, benchmark), dilated convs are > 1.5x slower than undilated ones of the same FLOPs."""
    best = [r for r in sweep if r["dtype"] == "bfloat16" and r["channels_last"] and r["benchmark"]]
    worst = max((r["slowdown_vs_d1"] for r in best if r["dilation"] > 1), default=1.0)
    return dict(max_dilated_slowdown_bf16_cl=worst, triton_conv_justified=bool(worst > 1.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves its compile time)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations (CPU allowed)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("needs a CUDA GPU (or --smoke)")
    cases = SMOKE if args.smoke else CASES
    warmup, iters = (1, 2) if args.smoke else (3, 10)
    t0 = time.time()
    report = dict(environment(device), smoke=args.smoke)
    # as the trainer and gpu_train.py: cuDNN times its algorithms, and hmedn_fast.ops.measured picks Triton or cuDNN
    # per convolution shape by timing (records before stop 17 ran the pathway with this off)
    torch.backends.cudnn.benchmark = report["cudnn_benchmark"] = device == "cuda"
    report["pathway"] = {n: bench_case(c, device, not args.no_compile and device == "cuda", warmup, iters)
                         for n, c in cases.items()}
    # which backend the measured choice took for every convolution signature the rows met, and the GPU times it
    # compared (hmedn_fast.ops.measured; ms for 5 calls)
    chosen = measured.remembered()
    report["measured_choices"] = [{"signature": repr(key), "chosen": chosen[key], "ms": times}
                                  for key, times in measured.timings().items()]
    report["norm_act"] = {n: bench_norm(c, device, warmup, iters) for n, c in cases.items()}
    if device == "cuda":
        report["cudnn_sweep"] = {n: cudnn_sweep(c, device, warmup, iters) for n, c in cases.items()}
        report["dilated_conv_verdict"] = {n: verdict(s) for n, s in report["cudnn_sweep"].items()}
        report["norm_grid"] = norm_grid(warmup, iters)
    report["seconds"] = time.time() - t0
    print_tables(report)
    args.out.mkdir(parents=True, exist_ok=True)
    card = card_slug(report["card"])
    path = args.out / f"blocks_{card}.json"
    path.write_text(json.dumps(report, indent=1))
    print("wrote", path)


def print_tables(report: dict) -> None:
    for name, res in report["pathway"].items():
        print(f"\n== {name}: {res['flops_fwd_bwd'] / 1e9:.0f} GFLOP fwd+bwd, best eager = {res['best_eager']}")
        print(f"{'impl':28s} {'ms':>8s} {'TFLOP/s':>8s} {'peak GiB':>9s} {'step GiB':>9s} {'speedup':>8s} "
              f"{'memory':>7s} {'feat err':>9s} {'grad err':>9s} ok")
        for impl, r in res["rows"].items():
            peak, own = (f"{r[k]:.3f}" if r.get(k) is not None else "-" for k in ("peak_gib", "step_peak_gib"))
            memory = f"{r['step_memory_vs_best_eager']:.3f}" if "step_memory_vs_best_eager" in r else "-"
            err = f"{r.get('features_err', float('nan')):9.1e} {r.get('grads_err', float('nan')):9.1e}"
            print(f"{impl:28s} {r['ms']:8.2f} {r['tflops']:8.1f} {peak:>9s} {own:>9s} {r['speedup_vs_best_eager']:8.2f} "
                  f"{memory:>7s} {err} {r.get('ok', '')}")
    if report["measured_choices"]:
        print("\n== measured backend choices (ms of 5 calls per backend)")
        for c in report["measured_choices"]:
            print(f"{c['chosen']:9s} " + " ".join(f"{k}={v:.3f}" for k, v in c["ms"].items()) + f"  {c['signature']}")
    for name, res in report["norm_act"].items():
        for dt, r in res.items():
            print(f"norm_act {name} {dt}: " + ", ".join(f"{k}={v:.3f}" for k, v in r.items()))
    for name, rows in report.get("cudnn_sweep", {}).items():
        print(f"\n== cuDNN sweep {name} (conv fwd + dgrad + wgrad)")
        for r in rows:
            print(f"bench={int(r['benchmark'])} {r['dtype']:9s} cl={int(r['channels_last'])} d={r['dilation']} "
                  f"{r['ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s x{r['slowdown_vs_d1']:.2f}")
    for name, v in report.get("dilated_conv_verdict", {}).items():
        print(f"verdict {name}: {v}")
    if "norm_grid" in report:
        print("\n== BatchNorm + ReLU fwd+bwd, bf16 channels-last 3D: kernel ms / wall ms (auto = automatic choice)")
        for r in report["norm_grid"]:
            print(f"{str(r['shape']):24s} {r['elements'] / 1e6:6.1f} M  triton {r['triton_kernel_ms']:.3f} / "
                  f"{r['triton_wall_ms']:.3f}  reference {r['reference_kernel_ms']:.3f} / {r['reference_wall_ms']:.3f}"
                  f"  floor {r['floor_ms']:.3f}  auto={'triton' if r['auto_triton'] else 'reference'}")
    print(f"total {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
