"""ONNX export of hmedn_fast models (inference-fused, standard ONNX ops, dynamic batch and spatial axes).

The graph has one input ``image`` (N, C, *spatial) float32 and outputs ``seg`` (N, K, *spatial) class logits
and, for models with a contour head, ``contour`` (N, 1, *spatial) logits. Batch and every spatial axis are
dynamic and may take ANY size: the model's own pad-to-``size_multiple`` / crop-back is traced from a
non-multiple example, so the graph holds it as Shape/Mod/Pad/Slice ops (for sizes that already are
multiples the pad is zero-sized). Sizes that are multiples of ``model.size_multiple`` avoid the padding work.

Exporter: PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``), which needs no
extra package and gives the same standard-op graph on torch 2.11 and 2.13.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..infer.engines import TensorOutputs, check_model, inference_model
from ..models.base import SegmentationModel

MIN_OPSET = 17
STANDARD_DOMAINS = ("", "ai.onnx")


def example_input(model: SegmentationModel, batch: int = 1) -> torch.Tensor:
    """A random tracing input (batch, in_channels, *spatial) whose spatial sizes are NOT multiples of
    ``size_multiple`` (so the pad/crop is traced), ``size_multiple + 1`` each (at least 9)."""
    size = max(model.size_multiple + 1, 9)
    return torch.randn((batch, model.in_channels) + (size,) * model.spatial_dims)


def output_names(model: SegmentationModel) -> list[str]:
    """``["seg"]`` or ``["seg", "contour"]``."""
    return ["seg"] + (["contour"] if model.contour_head is not None else [])


def export_onnx(model: SegmentationModel, path: str | os.PathLike, *, opset: int = MIN_OPSET, fuse: bool = True,
                check: bool = True) -> Path:
    """Export ``model`` (any :class:`SegmentationModel`) to an ONNX file at ``path``.

    Args:
        model: the model; an eval-mode copy is exported (fused: BatchNorm folded into the convolutions),
            on the CPU in float32. ``model`` itself is not modified.
        path: output file (parent folders are created).
        opset: ONNX opset, >= 17.
        fuse: fold BatchNorm before export (:func:`hmedn_fast.infer.engines.inference_model`).
        check: run ``onnx.checker.check_model`` and :func:`check_standard_ops` on the result.

    Returns:
        ``Path(path)``.

    Raises:
        TypeError: ``model`` is not a SegmentationModel.
        ValueError: ``opset`` < 17 or not an int; the checks fail.
    """
    check_model(model)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = TensorOutputs(inference_model(model, fuse)).to("cpu", torch.float32).eval()
    names = output_names(model)
    axes = {0: "batch", **{i + 2: f"spatial_{i}" for i in range(model.spatial_dims)}}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # the tracer warns about every shape-dependent Python branch of pad/crop; that is intended here
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (example_input(model),), buffer, dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=names, do_constant_folding=True,
                          dynamic_axes={name: axes for name in ["image"] + names})
    path.write_bytes(buffer.getvalue())
    if check:
        check_onnx_file(path, opset)
    return path


def check_onnx_file(path: str | os.PathLike, opset: int = MIN_OPSET) -> None:
    """``onnx.checker.check_model`` plus :func:`check_standard_ops`; ValueError naming the file on failure."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError and others
        raise ValueError(f"ONNX file {path} fails onnx.checker: {exc}") from exc
    check_standard_ops(onnx.load(str(path)), opset)


def check_standard_ops(model_proto, opset: int = MIN_OPSET) -> None:
    """ValueError unless every node uses the default ONNX domain and the graph's opset is >= ``opset``."""
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model_proto.graph.node if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise ValueError(f"ONNX graph uses non-standard ops {custom}")
    versions = [o.version for o in model_proto.opset_import if o.domain in STANDARD_DOMAINS]
    if not versions or max(versions) < opset:
        raise ValueError(f"ONNX graph has opset {versions}, expected >= {opset}")


def onnx_parity(model: SegmentationModel, path: str | os.PathLike, image: torch.Tensor) -> float:
    """Largest absolute difference between ONNX Runtime (CPU) and ``model.eval()`` (PyTorch, float32, CPU)
    over the outputs (``seg`` and ``contour`` logits) for ``image`` (N, C, *spatial).

    Raises:
        ValueError: the ONNX outputs differ from PyTorch's in shape or in having a contour output.
    """
    from ..infer.engines import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(path, providers=["CPUExecutionProvider"])
    seg, contour = engine(image)
    ref = inference_model(model, fuse=False).cpu()
    with torch.no_grad():
        out = ref(image.cpu().float())
    pairs = [(seg, out.seg)] + ([(contour, out.contour)] if out.contour is not None else [])
    if contour is None and out.contour is not None:
        raise ValueError(f"ONNX model {path} has no 'contour' output, the PyTorch model has one")
    for got, want in pairs:
        if got.shape != want.shape:
            raise ValueError(f"ONNX Runtime output shape {tuple(got.shape)} != PyTorch's {tuple(want.shape)}")
    return float(max(np.abs(got.numpy() - want.numpy()).max() for got, want in pairs))
