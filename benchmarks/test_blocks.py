"""pytest-benchmark: forward + backward of the HR pathway per checkpoint mode and dense-fusion variant.

Small shapes so it also runs on CPU (``python -m pytest benchmarks/test_blocks.py``); on a GPU the cases of
``benchmarks/gpu_blocks.py`` (which checks correctness and writes the JSON results) are the ones to read.
"""
from __future__ import annotations

import pytest
import torch

from gpu_blocks import SMOKE, build, make_inputs, step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dense_sum", [False, True], ids=["concat", "sum"])
@pytest.mark.parametrize("mode", ["none", "lean", "blocks"])
@pytest.mark.parametrize("case", list(SMOKE))
def test_pathway_forward_backward(benchmark, case, mode, dense_sum):
    path = build(SMOKE[case], DEVICE, mode)
    path.dense_sum = dense_sum
    x, gf, gl = make_inputs(SMOKE[case], DEVICE)

    def run():
        out = step(path, x, gf, gl, False)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(case=case, mode=mode, dense_sum=dense_sum, device=DEVICE)
    feats, gx = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert torch.isfinite(feats).all() and torch.isfinite(gx).all()
