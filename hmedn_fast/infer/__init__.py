"""Inference: sliding windows with Gaussian weighting and flip TTA over interchangeable engines (eager,
torch.compile + CUDA graph, ONNX Runtime, TensorRT), NIfTI/PNG input and output, and the ``hmedn infer``
command."""
from .engines import CompiledEngine, EagerEngine, Engine, OnnxRuntimeEngine, TensorOutputs, TensorRTEngine, \
    inference_model
from .io import LoadedImage, normalize, read_image, write_labels
from .sliding_window import SlidingWindowOutput, gaussian_importance, segment, sliding_window_inference, window_starts

__all__ = ["Engine", "EagerEngine", "CompiledEngine", "OnnxRuntimeEngine", "TensorRTEngine", "TensorOutputs",
           "inference_model", "sliding_window_inference", "segment", "SlidingWindowOutput", "gaussian_importance",
           "window_starts", "read_image", "write_labels", "normalize", "LoadedImage"]
