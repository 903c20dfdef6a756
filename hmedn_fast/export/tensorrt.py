"""TensorRT engine building from an exported ONNX file (TensorRT >= 10 Python API).

Written to the TensorRT Python API documentation (``Builder``, ``OnnxParser``, ``IBuilderConfig``,
``IOptimizationProfile``, ``build_serialized_network``); the ``tensorrt`` package is imported only when an
engine is built, and its absence raises ImportError with that reason. The engine's runner is
:class:`hmedn_fast.infer.engines.TensorRTEngine`, which plugs into the sliding window.

One optimisation profile covers the input: ``min_shape <= opt_shape <= max_shape`` (full shapes
(N, C, *spatial)), e.g. the sliding window's (sw_batch, C, 128, 128, 128) as ``opt`` and ``max``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

PRECISIONS = ("fp32", "fp16", "bf16")


def check_profile(min_shape: Sequence[int], opt_shape: Sequence[int], max_shape: Sequence[int]) -> tuple:
    """Validate an optimisation profile: three shapes of equal length (>= 4), positive ints, equal channel
    counts, ``min <= opt <= max`` per axis. Returns them as tuples; ValueError otherwise."""
    shapes = []
    for name, shape in (("min_shape", min_shape), ("opt_shape", opt_shape), ("max_shape", max_shape)):
        shape = tuple(shape)
        if len(shape) not in (4, 5) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"{name} must be (N, C, H, W) or (N, C, D, H, W) positive ints, got {shape!r}")
        shapes.append(shape)
    lo, opt, hi = shapes
    if not len(lo) == len(opt) == len(hi):
        raise ValueError(f"min/opt/max shapes must have the same length, got {lo}, {opt}, {hi}")
    if not lo[1] == opt[1] == hi[1]:
        raise ValueError(f"min/opt/max shapes must have the same channel count, got {lo[1]}, {opt[1]}, {hi[1]}")
    if any(not a <= b <= c for a, b, c in zip(lo, opt, hi)):
        raise ValueError(f"need min_shape <= opt_shape <= max_shape on every axis, got {lo}, {opt}, {hi}")
    return lo, opt, hi


def build_tensorrt_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                          min_shape: Sequence[int], opt_shape: Sequence[int], max_shape: Sequence[int],
                          precision: str = "fp16", workspace_gib: float = 4.0) -> Path:
    """Build and serialize a TensorRT engine from an ONNX file written by
    :func:`hmedn_fast.export.export_onnx`.

    Args:
        onnx_path: the ONNX model (input ``image``).
        engine_path: where the serialized engine is written.
        min_shape, opt_shape, max_shape: the optimisation profile of the input (:func:`check_profile`).
        precision: "fp32" (TF32 allowed), "fp16" or "bf16" (BuilderFlag.FP16 / BF16: lower-precision kernels
            allowed, I/O stays float32).
        workspace_gib: builder workspace memory-pool limit in GiB.

    Returns:
        ``Path(engine_path)``.

    Raises:
        ValueError: bad precision / profile / workspace, missing ONNX file, or a TensorRT without BF16.
        ImportError: the ``tensorrt`` package is not importable.
        RuntimeError: the ONNX parser or the builder fails (their messages are included).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    lo, opt, hi = check_profile(min_shape, opt_shape, max_shape)
    if not workspace_gib > 0:
        raise ValueError(f"workspace_gib must be > 0, got {workspace_gib!r}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ValueError(f"ONNX file {onnx_path} does not exist")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ImportError(f"building a TensorRT engine needs the 'tensorrt' Python package, which is not "
                          f"importable here: {exc}") from exc
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision != "fp32":
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:
            raise ValueError(f"TensorRT {trt.__version__} has no BuilderFlag.{precision.upper()}")
        config.set_flag(flag)
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    return engine_path
