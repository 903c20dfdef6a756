"""pytest-benchmark: forward + backward of the difficulty-guided loss on CUDA (eager, torch.compile, fused).

Run on a GPU machine: ``python -m pytest benchmarks/test_loss.py``. Cases and implementations are those of
``benchmarks/gpu_loss.py`` (which also checks correctness and writes the JSON results).
"""
from __future__ import annotations

import pytest
import torch

from gpu_loss import LABEL_DTYPES, LOGIT_DTYPES, SHAPES, fwd_bwd_step, implementations, make_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def impls():
    return implementations(with_compile=True)


@pytest.mark.parametrize("impl", ["eager", "compile", "fused", "fused_nocheck", "fused_2pass"])
@pytest.mark.parametrize("labels", list(LABEL_DTYPES))
@pytest.mark.parametrize("logits", list(LOGIT_DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_loss_forward_backward(benchmark, impls, shape, logits, labels, impl):
    case = make_case(SHAPES[shape], LOGIT_DTYPES[logits], LABEL_DTYPES[labels])
    fn = impls[impl]

    def step():
        fwd_bwd_step(fn, case)
        torch.cuda.synchronize()

    step()  # compile / autotune outside the timing
    benchmark.extra_info.update(shape=shape, logits=logits, labels=labels, impl=impl,
                                device=torch.cuda.get_device_name(0))
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    assert torch.isfinite(case["logits"].grad).all()
