"""GPU inference benchmark: hmedn_3d_l2 on one 1x4x128^3 window and a whole 4x240x240x155 volume by sliding
window (128^3 windows), across engines. Checks every engine against eager fp32 first, then times it.

    python benchmarks/gpu_infer.py --out DIR [--model hmedn_3d_l2] [--iters 30]

Engines: eager fp32 (PyTorch defaults: TF32 convolutions allowed), eager bf16 (autocast), torch.compile default
mode (fp32 model, no fusion: what a user gets from one call), the low-latency path (CompiledEngine: fused,
bf16 or fp16 weights, channels-last, torch.compile, CUDA graph), ONNX Runtime (CPU, 1-2 runs on the window:
it is slow; CUDA provider if installed) and TensorRT (only when ``import tensorrt`` works; fp16 engine).
Times: CUDA events around each call (host wall clock for ONNX Runtime CPU), after warm-up; p50/p90/p99 in ms.
Floor: FLOPs of one window forward / the card's measured bf16 matrix-product rate ("floor/t" = floor / time).
Peak memory: torch.cuda.max_memory_allocated during the timed calls (PyTorch allocations only, so not
meaningful for ONNX Runtime / TensorRT). Writes DIR/infer_<card>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmedn_fast.export import export_onnx  # noqa: E402
from hmedn_fast.infer import CompiledEngine, EagerEngine, OnnxRuntimeEngine, sliding_window_inference  # noqa: E402
from hmedn_fast.infer.engines import Engine, TensorOutputs  # noqa: E402
from hmedn_fast.models import create_model  # noqa: E402
from timing import cuda_times, host_times  # noqa: E402
from record import card_slug, environment  # noqa: E402

WINDOW = (128, 128, 128)
VOLUME = (240, 240, 155)


class TorchCompileDefault(Engine):
    """Baseline: ``torch.compile(model)`` in default mode on the plain (unfused, fp32) eval model."""

    def __init__(self, model) -> None:
        self._describe(model)
        self.device = next(model.parameters()).device
        self.fn = torch.compile(TensorOutputs(model).eval())

    def run(self, x):
        with torch.inference_mode():
            outs = self.fn(x.to(self.device))
        return outs[0].float(), (outs[1].float() if self.has_contour else None)


def percentiles(times_ms: list[float]) -> dict:
    a = np.asarray(times_ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "runs": len(a)}


def time_cuda(fn, warmup: int, iters: int) -> dict:
    """CUDA-event timing of ``fn()`` plus the peak PyTorch memory of the timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = cuda_times(fn, iters)
    peak = torch.cuda.max_memory_allocated()
    return {**percentiles(times), "peak_mem_mib": peak / 2**20, "peak_above_start_mib": (peak - base) / 2**20}


def time_host(fn, warmup: int, iters: int) -> dict:
    return percentiles(host_times(fn, iters, warmup))


def window_floor(model, x: torch.Tensor) -> dict:
    """The compute floor of one window: FLOPs of a forward (torch.utils.flop_counter) / the measured bf16
    rate of an 8192^3 matrix product on this card."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    a = torch.randn(8192, 8192, device=x.device, dtype=torch.bfloat16)
    rate = 2 * 8192**3 / (time_cuda(lambda: a @ a, 3, 10)["p50_ms"] * 1e-3)
    flops = counter.get_total_flops()
    return {"gflop_per_window": flops / 1e9, "bf16_matmul_tflops": rate / 1e12, "floor_ms": flops / rate * 1e3}


def agreement(probs: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max |p - p_ref| of the class probabilities and the fraction of voxels with the same argmax."""
    probs, ref = probs.float().to(ref.device), ref.float()
    return {"max_abs_prob_diff": float((probs - ref).abs().max()),
            "argmax_agreement": float((probs.argmax(1) == ref.argmax(1)).float().mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="hmedn_3d_l2")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--volume-reps", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = create_model(args.model).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained model has
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    model = model.to(dev)
    x = torch.randn((1, model.in_channels) + WINDOW, device=dev)
    results: dict = {"window": {}, "volume": {}, "checks": {}, "compile_s": {}, "floor": window_floor(model, x)}
    print("floor:", results["floor"], flush=True)

    def build(name, make):
        t = time.perf_counter()
        engine = make()
        engine(x)
        torch.cuda.synchronize()
        results["compile_s"][name] = round(time.perf_counter() - t, 1)
        return engine

    engines = {
        "eager_fp32": build("eager_fp32", lambda: EagerEngine(model, dev, fuse=False)),
        "eager_bf16": build("eager_bf16", lambda: EagerEngine(model, dev, torch.bfloat16, fuse=False)),
        "compile_default_fp32": build("compile_default_fp32", lambda: TorchCompileDefault(model)),
        "compiled_cudagraph_bf16": build("compiled_cudagraph_bf16",
                                         lambda: CompiledEngine(model, WINDOW, 1, dev, torch.bfloat16)),
        "compiled_cudagraph_fp16": build("compiled_cudagraph_fp16",
                                         lambda: CompiledEngine(model, WINDOW, 1, dev, torch.float16)),
    }
    print("compiled:", engines["compiled_cudagraph_bf16"].compiled, engines["compiled_cudagraph_fp16"].compiled,
          "build seconds:", results["compile_s"], flush=True)

    # 1. agreement with eager fp32 on one window (before any timing)
    ref = torch.softmax(engines["eager_fp32"](x)[0], 1)
    for name, engine in engines.items():
        results["checks"][name] = agreement(torch.softmax(engine(x)[0], 1), ref)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx")
        results["compile_s"]["onnx_export"] = round(time.perf_counter() - t, 1)
        ort_cpu = OnnxRuntimeEngine(onnx_path, providers=["CPUExecutionProvider"])
        results["checks"]["onnxruntime_cpu"] = agreement(torch.softmax(ort_cpu(x)[0], 1), ref)
        results["window"]["onnxruntime_cpu"] = time_host(lambda: ort_cpu(x), 0, 1)
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            ort_cuda = OnnxRuntimeEngine(onnx_path, providers=["CUDAExecutionProvider"])
            results["checks"]["onnxruntime_cuda"] = agreement(torch.softmax(ort_cuda(x)[0], 1), ref)
            results["window"]["onnxruntime_cuda"] = time_host(lambda: ort_cuda(x), 2, 10)
        try:
            import tensorrt  # noqa: F401

            from hmedn_fast.export import build_tensorrt_engine
            from hmedn_fast.infer.engines import TensorRTEngine

            t = time.perf_counter()
            shape = (1, model.in_channels) + WINDOW
            plan = build_tensorrt_engine(onnx_path, Path(tmp) / "model.engine", precision="fp16",
                                         min_shape=shape, opt_shape=shape, max_shape=shape)
            engines["tensorrt_fp16"] = TensorRTEngine(plan)
            results["compile_s"]["tensorrt_fp16"] = round(time.perf_counter() - t, 1)
            results["checks"]["tensorrt_fp16"] = agreement(torch.softmax(engines["tensorrt_fp16"](x)[0], 1), ref)
        except ImportError as exc:
            results["tensorrt"] = f"not measured: {exc}"
    ok = all(c["argmax_agreement"] > 0.99 for c in results["checks"].values())
    results["checks_passed"] = ok
    print("checks:", json.dumps(results["checks"], indent=1), flush=True)

    # 2. one 1x4x128^3 window
    for name, engine in engines.items():
        results["window"][name] = time_cuda(lambda: engine(x), 5, args.iters)
        print(f"window {name}: {results['window'][name]['p50_ms']:.2f} ms", flush=True)
    base = results["window"]["eager_fp32"]["p50_ms"]
    for r in results["window"].values():
        r["vs_eager_fp32"] = round(r["p50_ms"] / base, 3)
        r["floor_fraction"] = round(results["floor"]["floor_ms"] / r["p50_ms"], 3)

    # 3. whole volume, sliding window (128^3 windows, overlap 0.5, one window per call)
    del engines["compile_default_fp32"]
    volume = torch.randn((1, model.in_channels) + VOLUME, device=dev)
    sw = dict(overlap=0.5, sw_batch_size=1)
    ref_vol = sliding_window_inference(volume, engines["eager_fp32"], WINDOW, **sw).probabilities
    for name, engine in engines.items():
        out = sliding_window_inference(volume, engine, WINDOW, **sw).probabilities
        results["checks"][f"volume_{name}"] = agreement(out, ref_vol)
        del out
        results["volume"][name] = time_cuda(lambda: sliding_window_inference(volume, engine, WINDOW, **sw), 1,
                                            args.volume_reps)
        print(f"volume {name}: {results['volume'][name]['p50_ms']:.1f} ms", flush=True)

    import onnxruntime

    name = torch.cuda.get_device_name()
    record = {
        "benchmark": "infer", "model": args.model, **environment(), "onnxruntime": onnxruntime.__version__,
        "settings": {"window": WINDOW, "volume": (model.in_channels,) + VOLUME, "sliding_window": sw,
                     "cudnn_benchmark": True, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                     "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32},
        **results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"infer_{card_slug(name)}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"\n{args.model} on {name}, torch {torch.__version__}")
    fl = results["floor"]
    print(f"window floor: {fl['gflop_per_window']:.0f} GFLOP / {fl['bf16_matmul_tflops']:.0f} TFLOP/s (bf16 matmul) "
          f"= {fl['floor_ms']:.2f} ms")
    print(f"{'engine':28s} {'window p50':>11s} {'p90':>8s} {'p99':>8s} {'x eager':>8s} {'floor/t':>8s} "
          f"{'peak MiB':>9s} {'volume p50':>11s} {'peak MiB':>9s}")
    for key, r in results["window"].items():
        v = results["volume"].get(key, {})
        print(f"{key:28s} {r['p50_ms']:11.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f} {r['vs_eager_fp32']:8.3f} "
              f"{r['floor_fraction']:8.3f} {r.get('peak_mem_mib', float('nan')):9.0f} "
              f"{v.get('p50_ms', float('nan')):11.1f} {v.get('peak_mem_mib', float('nan')):9.0f}")
    print(f"checks passed: {ok}; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
