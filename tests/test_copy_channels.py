"""hmedn_fast.ops.copy.copy_channels_ (channel-slice copies of the lean dense block and the upsample backward):
equals ``Tensor.copy_`` for word-aligned slices (8-byte words), misaligned ones, NC* tensors, float64 and dtype
casts, touching nothing outside the slice; bad input."""
from __future__ import annotations

import pytest
import torch

from hmedn_fast.nn.dense_lean import _dense
from hmedn_fast.ops.copy import copy_channels_


@pytest.mark.parametrize("dtype, src_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                              (torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("start, width", [(0, 8), (8, 16), (2, 5), (3, 4)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_copy_into_and_out_of_slices(dtype, src_dtype, start, width, channels_last):
    """Into a slice of a 24-channel buffer (neighbours untouched); the lean block's ``_dense`` reads the slice
    back in its layout (and in another dtype)."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    buf = torch.randn(2, 24, 3, 4, 5).to(dtype=dtype, memory_format=fmt)
    src = torch.randn(2, width, 3, 4, 5).to(dtype=src_dtype, memory_format=fmt)
    want = buf.clone()
    want[:, start:start + width] = src
    assert copy_channels_(buf[:, start:start + width], src).data_ptr() == buf[:, start:].data_ptr()
    assert torch.equal(buf, want)
    dense = _dense(buf[:, start:start + width], dtype, fmt)
    assert torch.equal(dense, want[:, start:start + width]) and dense.is_contiguous(memory_format=fmt)
    assert torch.equal(_dense(buf[:, start:start + width], torch.float32, fmt), want[:, start:start + width].float())


def test_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        copy_channels_(torch.empty(1, 4, 3, 3), torch.empty(1, 5, 3, 3))
