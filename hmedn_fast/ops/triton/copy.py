"""Copy between channel slices of channels-last tensors (the lean dense block's shared buffer).

PyTorch's copy between two strided tensors computes every element's offsets with one division per dimension:
copying a 16-channel bf16 slice out of (or into) a 128^3 channels-last buffer ran at ~45 % of the copy bandwidth
on the H200 even as 8-byte words (``hmedn_fast.nn.dense_lean``). Here both tensors are (N, C, S) views with
channel stride 1 and one spatial stride each (``ncs_strides``); a program moves a (BLOCK_S, C) tile: row
offsets are one multiply, and each row is a contiguous run of C elements.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from hmedn_fast.ops.triton.launch import FastLauncher, cdiv, next_power_of_2

BLOCK_ELEMENTS = 4096  # per program: BLOCK_S rows x BLOCK_C channels


@triton.jit
def _copy_channels_kernel(dst_ptr, src_ptr, C, S, dn, ds, sn, ss, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    n = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = (s < S)[:, None] & (c < C)[None, :]
    v = tl.load(src_ptr + n * sn + s[:, None] * ss + c[None, :], mask=mask)
    tl.store(dst_ptr + n * dn + s[:, None] * ds + c[None, :], v, mask=mask)


_KERNEL = FastLauncher(_copy_channels_kernel)


def copy_channels_(dst: Tensor, src: Tensor, dst_strides: tuple[int, int, int],
                   src_strides: tuple[int, int, int]) -> Tensor:
    """``dst.copy_(src)`` for (N, C, *spatial) tensors of one shape whose (n, c, s) element strides (see
    :func:`hmedn_fast.ops.triton.norm.ncs_strides`) have c stride 1, of one dtype.
    Returns dst."""
    n, c = dst.shape[:2]
    s = dst.numel() // max(n * c, 1)
    if dst.numel() == 0:
        return dst
    block_c = next_power_of_2(c)
    block_s = max(16, BLOCK_ELEMENTS // block_c)
    _KERNEL((cdiv(s, block_s), n), dst, src, c, s, dst_strides[0], dst_strides[2], src_strides[0], src_strides[2],
            BLOCK_S=block_s, BLOCK_C=block_c)
    return dst
