"""hmedn_fast.ops.copy.copy_channels_ (channel-slice copies of the lean dense block): both backends equal
``Tensor.copy_`` and touch nothing outside the slice; the Triton kernel runs under TRITON_INTERPRET=1 (and on the
GPU, marked ``cuda``); backend choice and bad input.

The interpreted tests run in a TRITON_INTERPRET=1 subprocess (``test_interpreter_suite``)."""
from __future__ import annotations

import pytest
import torch

from hmedn_fast.nn.dense_lean import _dense
from hmedn_fast.ops.copy import copy_channels_

CL = {4: torch.channels_last, 5: torch.channels_last_3d}


@pytest.mark.not_interpreted
def test_interpreter_suite(interpreter_suite):
    interpreter_suite(__file__)


def _case(shape, channels, start, width, dtype, src_dtype, channels_last, device="cpu"):
    fmt = CL[len(shape) + 1] if channels_last else torch.contiguous_format
    buf = torch.randn(shape[0], channels, *shape[1:], device=device).to(dtype=dtype, memory_format=fmt)
    src = torch.randn(shape[0], width, *shape[1:], device=device).to(dtype=src_dtype, memory_format=fmt)
    want = buf.clone()
    want[:, start:start + width] = src
    return buf, src, want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("start, width", [(0, 8), (8, 16), (2, 5), (3, 4)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_reference_copy_into_and_out_of_slices(dtype, start, width, channels_last):
    """Word-wise copies for aligned slices, element-wise for misaligned ones, NC* tensors and float64; the lean
    block's ``_dense`` reads a slice back in its layout (and in another dtype)."""
    buf, src, want = _case((2, 3, 4, 5), 24, start, width, dtype, dtype, channels_last)
    copy_channels_(buf[:, start:start + width], src, backend="reference")
    assert torch.equal(buf, want)
    fmt = CL[5] if channels_last else torch.contiguous_format
    dense = _dense(buf[:, start:start + width], dtype, fmt)
    assert torch.equal(dense, src) and dense.is_contiguous(memory_format=fmt)
    assert torch.equal(_dense(buf[:, start:start + width], torch.float32, fmt), src.float())


@pytest.mark.interpreted
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 7, 9), (1, 33, 2, 2)])
@pytest.mark.parametrize("start, width", [(0, 16), (16, 16), (3, 5), (1, 40)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_triton_copy_into_and_out_of_slices(shape, start, width, dtype):
    """Into a slice of a channels-last buffer (neighbours untouched), out of it into a dense tensor."""
    src_dtype = dtype
    buf, src, want = _case(shape, 48, start, width, dtype, src_dtype, True)
    assert copy_channels_(buf[:, start:start + width], src, backend="triton") is not None
    assert torch.equal(buf, want)
    out = torch.full_like(src, float("nan"))  # poisoned: every element must be written
    copy_channels_(out, buf[:, start:start + width], backend="triton")
    assert torch.equal(out, want[:, start:start + width].to(src_dtype))


@pytest.mark.interpreted
def test_triton_copy_automatic_choice_and_fallback(monkeypatch):
    """Automatic: Triton for channels-innermost tensors (interpreter here), the reference for NC* ones; forcing
    Triton on NC* tensors names the reason."""
    calls = []
    import hmedn_fast.ops.triton.copy as kernels
    real = kernels.copy_channels_
    monkeypatch.setattr(kernels, "copy_channels_", lambda *a: calls.append(1) or real(*a))
    buf, src, want = _case((2, 3, 4, 5), 24, 8, 8, torch.float32, torch.float32, True)
    copy_channels_(buf[:, 8:16], src)
    assert torch.equal(buf, want) and calls == [1]
    buf, src, want = _case((2, 3, 4, 5), 24, 8, 8, torch.float32, torch.float32, False)
    copy_channels_(buf[:, 8:16], src)
    assert torch.equal(buf, want) and calls == [1]
    with pytest.raises(RuntimeError, match="channel stride 1"):
        copy_channels_(buf[:, 8:16], src, backend="triton")
    buf, src, want = _case((2, 3, 4, 5), 24, 8, 8, torch.bfloat16, torch.float32, True)
    copy_channels_(buf[:, 8:16], src)  # a cast: the reference (rounding as torch does)
    assert torch.equal(buf, want) and calls == [1]


@pytest.mark.not_interpreted
def test_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        copy_channels_(torch.empty(1, 4, 3, 3), torch.empty(1, 5, 3, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        copy_channels_(torch.empty(1, 4, 3, 3), torch.empty(1, 4, 3, 3), backend="cuda")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        copy_channels_(torch.empty(1, 4, 3, 3), torch.empty(1, 4, 3, 3), backend="triton")


@pytest.mark.cuda
def test_cuda_copy_full_resolution_slices():
    """A 16-channel bf16 slice of an 80-channel 128^3 buffer, in and out (the lean block's largest copies)."""
    buf, src, want = _case((1, 128, 128, 128), 80, 32, 16, torch.bfloat16, torch.bfloat16, True, "cuda")
    copy_channels_(buf[:, 32:48], src)
    assert torch.equal(buf, want)
    out = torch.full_like(src, float("nan"))
    copy_channels_(out, buf[:, 32:48])
    assert torch.equal(out, src)
