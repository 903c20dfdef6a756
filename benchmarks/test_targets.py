"""pytest-benchmark suite of the training targets (contour + weight maps) on the workloads of issue 4.

    python -m pytest benchmarks/test_targets.py --benchmark-only [-k 2d]

CPU rows run anywhere (the C++ rows need the compiled extension); GPU rows skip without CUDA. The
standalone GPU script with the floor and the JSON report is ``benchmarks/gpu_targets.py``.
"""
from __future__ import annotations

import pytest
import torch

from gpu_targets import WORKLOADS, ext_targets, make_labels, ref_targets, scipy_targets
from hmedn_fast.ops import targets_ext

ROUNDS = {"3d": 2, "2d": 10}


def _needs(backend: str, labels: torch.Tensor) -> None:
    reason = targets_ext.unavailable(backend, labels)
    if reason is not None:
        pytest.skip(reason)


def _run(benchmark, fn, workload: str, cuda: bool = False):
    def call():
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out

    call()  # warm-up (module load, allocator, CUDA context)
    return benchmark.pedantic(call, rounds=ROUNDS[workload], iterations=1)


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_scipy_one_sample(benchmark, workload):
    labels = make_labels(workload)[0].numpy()
    benchmark.extra_info["samples"] = 1
    _run(benchmark, lambda: scipy_targets(labels, WORKLOADS[workload][2]), workload)


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_reference_cpu(benchmark, workload):
    labels = make_labels(workload)
    benchmark.extra_info["samples"] = labels.shape[0]
    _run(benchmark, lambda: ref_targets(labels), workload)


@pytest.mark.parametrize("threads", [1, None], ids=["1thread", "allthreads"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_cpp_cpu(benchmark, workload, threads):
    labels = make_labels(workload)
    _needs("cpu", labels)
    benchmark.extra_info["samples"] = labels.shape[0]
    old = torch.get_num_threads()
    torch.set_num_threads(threads or old)
    try:
        _run(benchmark, lambda: ext_targets(labels), workload)
    finally:
        torch.set_num_threads(old)


@pytest.mark.cuda
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_reference_gpu(benchmark, workload):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    labels = make_labels(workload).cuda()
    benchmark.extra_info["samples"] = labels.shape[0]
    _run(benchmark, lambda: ref_targets(labels), workload, cuda=True)


@pytest.mark.cuda
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_cuda(benchmark, workload):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    labels = make_labels(workload).cuda()
    _needs("cuda", labels)
    benchmark.extra_info["samples"] = labels.shape[0]
    _run(benchmark, lambda: ext_targets(labels), workload, cuda=True)
