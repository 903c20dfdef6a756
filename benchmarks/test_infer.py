"""CPU benchmarks of the inference path (pytest-benchmark; small shapes so they run anywhere):
sliding window over a 3D volume with eager PyTorch vs ONNX Runtime, and the window-weight bookkeeping alone.

    python -m pytest benchmarks/test_infer.py --benchmark-only

GPU numbers (hmedn_3d_l2, 1x4x128^3 and 4x240x240x155) come from benchmarks/gpu_infer.py.
"""
from __future__ import annotations

import pytest
import torch

from hmedn_fast.export import export_onnx
from hmedn_fast.infer import EagerEngine, OnnxRuntimeEngine, sliding_window_inference
from hmedn_fast.infer.engines import Engine
from hmedn_fast.models import create_model

VOLUME = (1, 4, 48, 48, 40)
ROI = (32, 32, 32)


@pytest.fixture(scope="module")
def model():
    return create_model("hmedn_3d_l2", widths=(8, 16, 24, 32), growth_rates=8, num_layers=2, hr_channels=8,
                        hr_blocks=3).eval()


class ConstantEngine(Engine):
    """Zero-cost network: isolates the sliding window's own cost (gather, softmax, weighting, scatter)."""

    def __init__(self) -> None:
        self.spatial_dims, self.in_channels, self.num_classes, self.has_contour = 3, 4, 4, True
        self.device = torch.device("cpu")

    def run(self, x):
        seg = torch.zeros((x.shape[0], 4) + x.shape[2:])
        return seg, seg[:, :1]


@pytest.mark.parametrize("engine_name", ["eager_fp32", "onnxruntime_cpu"])
def test_sliding_window_volume(benchmark, model, engine_name, tmp_path):
    engine = (EagerEngine(model) if engine_name == "eager_fp32"
              else OnnxRuntimeEngine(export_onnx(model, tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]))
    x = torch.randn(VOLUME)
    out = benchmark.pedantic(sliding_window_inference, args=(x, engine, ROI), kwargs={"overlap": 0.5},
                             rounds=3, warmup_rounds=1)
    assert out.probabilities.shape == (1, 4) + VOLUME[2:]


def test_sliding_window_overhead(benchmark):
    x = torch.randn(VOLUME)
    out = benchmark(sliding_window_inference, x, ConstantEngine(), ROI, overlap=0.5, sw_batch_size=4)
    torch.testing.assert_close(out.probabilities, torch.full_like(out.probabilities, 0.25))
