"""Export of hmedn_fast models: ONNX (standard ops, dynamic axes), TensorRT engines built from it, TorchScript."""
from .onnx import check_onnx_file, check_standard_ops, export_onnx, onnx_parity
from .tensorrt import build_tensorrt_engine, check_profile
from .torchscript import export_torchscript

__all__ = ["export_onnx", "check_onnx_file", "check_standard_ops", "onnx_parity", "build_tensorrt_engine",
           "check_profile", "export_torchscript"]
