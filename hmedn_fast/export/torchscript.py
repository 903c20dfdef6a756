"""TorchScript export: a traced, inference-fused module returning ``(seg,)`` or ``(seg, contour)``.

Like the ONNX export, the trace is taken on a non-multiple example size so the model's pad/crop is recorded
with shape-dependent sizes: the traced module accepts any batch and spatial size.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..infer.engines import TensorOutputs, check_model, inference_model
from ..models.base import SegmentationModel
from .onnx import example_input


def export_torchscript(model: SegmentationModel, path: str | os.PathLike, *, fuse: bool = True) -> Path:
    """Trace ``model`` (eval copy, fused when ``fuse``, CPU float32) and save it with ``torch.jit.save``.

    Load with ``torch.jit.load(path)``; calling it on (N, C, *spatial) float32 returns a tuple of logits.

    Raises:
        TypeError: ``model`` is not a SegmentationModel.
    """
    check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = TensorOutputs(inference_model(model, fuse)).to("cpu", torch.float32).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(net, (example_input(model),), check_trace=False)
    torch.jit.save(traced, str(path))
    return path
