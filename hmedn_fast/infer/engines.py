"""Inference engines: one interface over eager PyTorch, torch.compile + CUDA graphs, ONNX Runtime and TensorRT.

Every engine is a callable ``engine(x) -> (seg, contour)`` on a batch of windows:

* ``x``: (B, in_channels, *window) floating tensor (any device; the engine moves it).
* ``seg``: (B, num_classes, *window) float32 class logits on ``engine.device``.
* ``contour``: (B, 1, *window) float32 contour logits, or None when the network has no contour head.

and describes itself with ``spatial_dims``, ``in_channels``, ``num_classes``, ``has_contour``, ``device``,
``window`` (a fixed spatial window, or None when any size is accepted) and ``batch`` (a fixed batch size or
None). :func:`hmedn_fast.infer.sliding_window_inference` takes any of them (or a plain model, wrapped in
:class:`EagerEngine`).
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..device import channels_last_format
from ..models.base import SegmentationModel
from ..nn.fusion import fuse_for_inference

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TensorOutputs(nn.Module):
    """Wrap a :class:`SegmentationModel` so that it returns plain tensors: ``(seg,)`` or ``(seg, contour)``
    (the form ONNX export, TorchScript tracing and CUDA graph capture need). Aux outputs are dropped."""

    def __init__(self, model: SegmentationModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        return (out.seg,) if out.contour is None else (out.seg, out.contour)


def check_model(model: object) -> SegmentationModel:
    """Raise TypeError unless ``model`` is an hmedn_fast :class:`SegmentationModel`."""
    if not isinstance(model, SegmentationModel):
        raise TypeError(f"model must be an hmedn_fast SegmentationModel (from create_model / load_model), "
                        f"got {type(model).__name__}")
    return model


def inference_model(model: SegmentationModel, fuse: bool = True) -> SegmentationModel:
    """An eval-mode copy of ``model`` for inference: BatchNorm folded into the convolutions when ``fuse``
    (:func:`hmedn_fast.nn.fusion.fuse_for_inference`), else a plain eval copy. ``model`` itself is not
    modified."""
    check_model(model)
    return fuse_for_inference(model) if fuse else copy.deepcopy(model).eval()


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    return dtype


def _check_window(window: Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    window = tuple(window)
    if len(window) != spatial_dims or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in window):
        raise ValueError(f"window must be {spatial_dims} positive ints for a {spatial_dims}D model, got {window!r}")
    return window


class Engine:
    """Base class: subclasses set the attributes below and implement :meth:`run`."""

    spatial_dims: int
    in_channels: int
    num_classes: int
    has_contour: bool
    device: torch.device
    window: tuple[int, ...] | None = None
    batch: int | None = None

    def check_input(self, x: torch.Tensor) -> None:
        """Raise TypeError/ValueError when ``x`` is not a (B, in_channels, *window) floating tensor."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"engine input must be a floating-point torch.Tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"engine input must be (B, {self.in_channels}, *spatial) with {self.spatial_dims} "
                             f"spatial dims, got shape {tuple(x.shape)}")
        if self.window is not None and tuple(x.shape[2:]) != self.window:
            raise ValueError(f"this engine runs windows of size {self.window} only, got {tuple(x.shape[2:])}")
        if self.batch is not None and not 1 <= x.shape[0] <= self.batch:
            raise ValueError(f"this engine runs at most {self.batch} windows at once, got {x.shape[0]}")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.check_input(x)
        return self.run(x)

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _describe(self, model: SegmentationModel) -> None:
        self.spatial_dims, self.in_channels = model.spatial_dims, model.in_channels
        self.num_classes, self.has_contour = model.num_classes, model.contour_head is not None


class EagerEngine(Engine):
    """Plain PyTorch: the (fused) eval model, optionally under autocast.

    Args:
        model: a :class:`SegmentationModel` (copied; the original is untouched).
        device: where to run (default: the model's parameters' device).
        dtype: float32 (no autocast), or bfloat16 / float16 autocast.
        fuse: fold BatchNorm into the convolutions first.
        channels_last: run in channels-last memory format (faster convolutions on GPUs).
    """

    def __init__(self, model: SegmentationModel, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, fuse: bool = True, channels_last: bool = False) -> None:
        check_model(model)
        self.dtype = _check_dtype(dtype)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._describe(model)
        self.memory_format = channels_last_format(model.spatial_dims) if channels_last else torch.contiguous_format
        self.model = inference_model(model, fuse).to(self.device, memory_format=self.memory_format)

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x.to(self.device, torch.float32).contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype,
                                                    enabled=self.dtype != torch.float32):
            out = self.model(x)
        return out.seg.float(), (out.contour.float() if out.contour is not None else None)


class CompiledEngine(Engine):
    """Low-latency PyTorch path for a fixed window: fused model, weights cast to ``dtype``, channels-last,
    ``torch.compile`` and (on CUDA) one CUDA graph capture, replayed for every call.

    Calls with fewer than ``batch`` windows copy them into the static input and return the first rows.
    If ``torch.compile`` fails (no Triton, unsupported platform), the engine warns and captures the eager
    fused model instead (``engine.compiled`` is then False), so the path always works. cuDNN autotuning
    (``cudnn.benchmark``) is switched on while warming up and capturing, then restored.

    Args:
        model: a :class:`SegmentationModel` (copied).
        window: the fixed spatial window (ints, one per spatial dim).
        batch: the fixed batch size (windows per call).
        device: CUDA device for ``cuda_graph=True``; any device otherwise.
        dtype: compute dtype of weights and activations (bfloat16 default; float32 / float16).
        cuda_graph: capture a CUDA graph (CUDA devices only).
        compile: run ``torch.compile`` (mode ``compile_mode``) before capture.
        compile_mode: a ``torch.compile`` mode without its own CUDA graphs ("default",
            "max-autotune-no-cudagraphs").
        compile_options: Inductor options for ``torch.compile(options=...)``, e.g. ``{"freezing": True}``; used
            instead of ``compile_mode`` (torch.compile takes one or the other).
        channels_last: run in channels-last memory format.
        fuse: fold BatchNorm into the convolutions.
        warmup: eager / compiled runs before capture (compilation and cuDNN autotuning happen there).
    """

    def __init__(self, model: SegmentationModel, window: Sequence[int], batch: int = 1,
                 device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, cuda_graph: bool = True,
                 compile: bool = True, compile_mode: str = "default", compile_options: dict | None = None,
                 channels_last: bool = True, fuse: bool = True, warmup: int = 3) -> None:
        check_model(model)
        self.device = torch.device(device)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got device={self.device}")
        if compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile_mode={compile_mode!r} captures its own CUDA graphs; use 'default' or "
                             "'max-autotune-no-cudagraphs' (this engine captures the graph itself)")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        self.dtype = _check_dtype(dtype)
        self._describe(model)
        self.window, self.batch = _check_window(window, model.spatial_dims), batch
        fmt = channels_last_format(model.spatial_dims) if channels_last else torch.contiguous_format
        net = TensorOutputs(inference_model(model, fuse)).to(self.device, self.dtype, memory_format=fmt).eval()
        self.static_input = torch.zeros((batch, self.in_channels) + self.window, device=self.device,
                                        dtype=self.dtype).contiguous(memory_format=fmt)
        self.compiled = False
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True  # autotune convolutions once; the graph then replays the choice
        try:
            fn = net
            if compile:
                try:
                    kwargs = {"options": dict(compile_options)} if compile_options else {"mode": compile_mode}
                    fn = torch.compile(net, dynamic=False, **kwargs)
                    self._warm(fn, warmup)
                    self.compiled = True
                except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to the eager graph
                    warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); using the eager fused model",
                                  RuntimeWarning, stacklevel=2)
                    fn = net
            if not self.compiled:
                self._warm(fn, warmup)
            self.graph = None
            if cuda_graph:
                self.graph = torch.cuda.CUDAGraph()
                # captured on a stream of the engine's device (torch.cuda.graph's default capture stream is one per
                # process, on whichever device was current at the first capture)
                with torch.inference_mode(), torch.cuda.graph(self.graph, stream=torch.cuda.Stream(self.device)):
                    self.static_output = fn(self.static_input)
        finally:
            torch.backends.cudnn.benchmark = benchmark
        self._fn = fn

    def _warm(self, fn, steps: int) -> None:
        with torch.inference_mode():
            if self.device.type != "cuda":
                for _ in range(max(steps, 1)):
                    fn(self.static_input)
                return
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(max(steps, 1)):
                    fn(self.static_input)
            torch.cuda.current_stream(self.device).wait_stream(side)

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = x.shape[0]
        self.static_input[:n].copy_(x)
        if self.graph is not None:
            self.graph.replay()  # on the device it was captured on
            outs = self.static_output
        else:
            with torch.inference_mode():
                outs = self._fn(self.static_input)
        seg = outs[0][:n].float()
        return seg, (outs[1][:n].float() if self.has_contour else None)


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime session over a model exported by :func:`hmedn_fast.export.export_onnx`.

    Args:
        onnx_model: path of the .onnx file (or its bytes).
        providers: ONNX Runtime execution providers (default: CUDA when available, then CPU).
        threads: intra-op threads (0 = ONNX Runtime's default).

    Input/output shapes are read from the graph: input ``image`` (B, C, *spatial), outputs ``seg`` (and
    ``contour``). Data goes through host memory (numpy); outputs are returned on the CPU.
    """

    def __init__(self, onnx_model: str | os.PathLike | bytes, providers: Sequence[str] | None = None,
                 threads: int = 0) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        missing = [p for p in providers if p not in available]
        if missing:
            raise ValueError(f"onnxruntime providers {missing} are not available here (available: {available})")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        source = onnx_model if isinstance(onnx_model, bytes) else str(Path(onnx_model))
        try:
            self.session = ort.InferenceSession(source, options, providers=list(providers))
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ValueError(f"cannot load ONNX model {onnx_model if not isinstance(onnx_model, bytes) else '<bytes>'}:"
                             f" {exc}") from exc
        inp = self.session.get_inputs()[0]
        outs = [o.name for o in self.session.get_outputs()]
        if "seg" not in outs:
            raise ValueError(f"ONNX model has outputs {outs}; expected 'seg' (and 'contour') as written by export_onnx")
        self.input_name, self.output_names = inp.name, ["seg"] + (["contour"] if "contour" in outs else [])
        self.spatial_dims, self.in_channels = len(inp.shape) - 2, int(inp.shape[1])
        self.num_classes = int(next(o.shape[1] for o in self.session.get_outputs() if o.name == "seg"))
        self.has_contour = "contour" in outs
        self.providers = self.session.get_providers()
        self.device = torch.device("cpu")

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feed = {self.input_name: x.detach().to("cpu", torch.float32).contiguous().numpy()}
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(self.output_names, feed)]
        return outs[0].float(), (outs[1].float() if self.has_contour else None)


_TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16}


class TensorRTEngine(Engine):
    """Runner of a serialized TensorRT engine built by :func:`hmedn_fast.export.build_tensorrt_engine`.

    Uses the TensorRT (>= 10) Python API: ``Runtime.deserialize_cuda_engine``, then per call
    ``IExecutionContext.set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on PyTorch's current
    CUDA stream, with outputs written straight into PyTorch tensors. Any window inside the engine's
    optimisation profile is accepted (``window`` is None); shapes outside it raise ValueError.

    Args:
        engine_path: the serialized engine (.engine / .plan file).
        device: the CUDA device the engine was built for.
    """

    def __init__(self, engine_path: str | os.PathLike, device: str | torch.device = "cuda") -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise ImportError("TensorRTEngine needs the 'tensorrt' Python package (pip install tensorrt), which "
                              f"is not importable here: {exc}") from exc
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"TensorRTEngine needs a CUDA device, got device={self.device}")
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ValueError(f"cannot deserialize TensorRT engine {engine_path} (built by another TensorRT version "
                             "or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or "seg" not in outputs:
            raise ValueError(f"TensorRT engine {engine_path} has inputs {inputs} and outputs {outputs}; expected one "
                             "input and a 'seg' output (export_onnx's names)")
        self.input_name = inputs[0]
        self.output_names = ["seg"] + (["contour"] if "contour" in outputs else [])
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.spatial_dims, self.in_channels = len(shape) - 2, int(shape[1])
        self.num_classes = int(self.engine.get_tensor_shape("seg")[1])
        self.has_contour = "contour" in outputs
        self.profile = [tuple(s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0)]
        self.input_dtype = self._torch_dtype(self.engine.get_tensor_dtype(self.input_name))

    def _torch_dtype(self, trt_dtype) -> torch.dtype:
        name = getattr(trt_dtype, "name", str(trt_dtype).split(".")[-1])
        if name not in _TRT_TO_TORCH:
            raise ValueError(f"unsupported TensorRT tensor dtype {trt_dtype}")
        return _TRT_TO_TORCH[name]

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        lo, hi = self.profile[0], self.profile[2]
        if any(not a <= s <= b for s, a, b in zip(x.shape, lo, hi)):
            raise ValueError(f"input shape {tuple(x.shape)} is outside the engine's optimisation profile "
                             f"[{lo}, {hi}]; rebuild the engine with a profile that covers it")
        x = x.to(self.device, self.input_dtype).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        outs = []
        for name in self.output_names:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), device=self.device,
                              dtype=self._torch_dtype(self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        return outs[0].float(), (outs[1].float() if self.has_contour else None)
