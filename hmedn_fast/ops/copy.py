"""``copy_channels_(dst, src)``: copy between channel slices of channels-last tensors.

The lean dense block (:mod:`hmedn_fast.nn.dense_lean`) writes every layer's output into a slice of one shared
buffer and reads gradient slices back out; the upsample backward makes channel slices dense. PyTorch's copy
between strided tensors costs per element (offsets by one division per dimension), so same-dtype
channels-innermost copies go through 8-byte-word views: a bf16 slice moves 4x fewer elements (the element-wise
copy into a buffer slice ran at a quarter of the copy bandwidth on the H200, the word copy at ~45 %). A Triton
kernel moving (rows x channels) tiles was measured too and was no faster in the lean training step (H200, stop 15,
``docs/decisions/blocks.md``).
"""
from __future__ import annotations

import torch
from torch import Tensor


def copy_channels_(dst: Tensor, src: Tensor) -> Tensor:
    """``dst.copy_(src)`` for two (N, C, *spatial) tensors of one shape (dtypes may differ), typically channel
    slices of channels-last tensors; element-wise when the dtypes differ, the channels are not innermost, or a
    channel run or offset is not a whole number of 8-byte words. Returns dst.

    Raises:
        ValueError: the shapes differ.
    """
    if dst.shape != src.shape:
        raise ValueError(f"dst and src must have one shape, got {tuple(dst.shape)} and {tuple(src.shape)}")
    if dst.dtype == src.dtype and dst.element_size() < 8 and dst.ndim > 2 and dst.stride(1) == 1 == src.stride(1):
        perm = (0, *range(2, dst.ndim), 1)
        try:
            words = dst.permute(perm).view(torch.int64), src.permute(perm).view(torch.int64)
        except RuntimeError:  # not a whole number of words
            return dst.copy_(src)
        words[0].copy_(words[1])
        return dst
    return dst.copy_(src)
