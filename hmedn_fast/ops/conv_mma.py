"""Tensor-core 3x3x3 convolution of the HR pathway's shape (``kernels/conv3x3.cu``, CUDA builds of the extension):
"same" padding, stride 1, 32 -> 32 channels, bf16/fp16 channels-last volumes, float32 accumulation. Each block
copies an input plane with its halo into shared memory once per kernel depth and feeds all nine in-plane taps from
it (the Triton kernels load every shifted tile separately).

:func:`conv3x3_forward` is ``F.conv3d(x, weight, padding=d, dilation=d)``; :func:`conv3x3_input_grad` its input
gradient (the same kernel on the flipped, channel-swapped weight). :func:`unsupported` says why a call cannot run.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hmedn_fast.ops import _ext
from hmedn_fast.ops.strides import voxel_stride

CHANNELS = 32


def unsupported(x: Tensor, weight: Tensor, dilation: int, out: Tensor | None = None) -> str | None:
    """None when :func:`conv3x3_forward` can run ``x`` (N, 32, D, H, W) with ``weight`` (32, 32, 3, 3, 3) and
    ``dilation`` (into ``out`` when given); else the reason. The same holds for :func:`conv3x3_input_grad` with the
    output gradient as ``x``."""
    ext = _ext.extension()
    if ext is None or not hasattr(ext, "conv3x3_mma_"):
        return "the extension was built without its CUDA kernels"
    if not x.is_cuda:
        return "x is not a CUDA tensor"
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        return "x and weight must both be bfloat16 or float16"
    if x.ndim != 5 or x.shape[1] != CHANNELS or tuple(weight.shape) != (CHANNELS, CHANNELS, 3, 3, 3):
        return "only 3x3x3 convolutions of 32 -> 32 channels"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return "needs compute capability 8.0 or newer"
    vs = voxel_stride(x)
    if vs is None or vs % 8 or x.data_ptr() % 16 or x.numel() == 0:
        return "x must be channels-last (or a channel slice of one at a multiple of 8 channels), 16-byte aligned"
    if not 1 <= int(dilation) <= ext.conv3x3_mma_max_dilation():
        return f"dilation {dilation} outside [1, {ext.conv3x3_mma_max_dilation()}]"
    if x.shape[0] > 65535 or x.shape[2] > 65535 or x.numel() >= 2**31:
        return "batch and depth must be at most 65535, and fewer than 2**31 elements"
    if out is not None:
        ovs = voxel_stride(out)
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or ovs is None or ovs % 2 \
                or out.data_ptr() % 4:
            return "out must be like x: channels innermost, an even voxel stride, 4-byte aligned"
    return None


def _run(x: Tensor, packed: Tensor, dilation: int, out: Tensor | None, flip: bool) -> Tensor:
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last_3d)
    _ext.extension().conv3x3_mma_(x, packed, out, int(dilation), flip)
    return out


def conv3x3_forward(x: Tensor, weight: Tensor, dilation: int, out: Tensor | None = None) -> Tensor:
    """``F.conv3d(x, weight, None, 1, dilation, dilation)``.

    Args:
        x: (N, 32, D, H, W) bf16/fp16, channels innermost (see :func:`unsupported`).
        weight: (32, 32, 3, 3, 3), x's dtype.
        dilation: kernel dilation (the padding equals it).
        out: None, or an (N, 32, D, H, W) tensor of x's dtype with channels innermost (e.g. a channel slice of a
            channels-last buffer) to write into.
    Returns:
        (N, 32, D, H, W) in x's dtype (channels-last when allocated here).
    """
    packed = weight.permute(2, 3, 4, 0, 1).reshape(27, CHANNELS, CHANNELS).contiguous()  # (tap, out, in)
    return _run(x, packed, dilation, out, False)


def conv3x3_input_grad(grad: Tensor, weight: Tensor, dilation: int) -> Tensor:
    """Input gradient of :func:`conv3x3_forward` for output gradient ``grad`` (N, 32, D, H, W) (same contract as x):
    the convolution of ``grad`` with the weight flipped along its kernel axes (the kernel reads the taps in reverse)
    and its channel axes swapped. Returns (N, 32, D, H, W) channels-last in grad's dtype."""
    packed = weight.permute(2, 3, 4, 1, 0).reshape(27, CHANNELS, CHANNELS).contiguous()  # (tap, in, out)
    return _run(grad, packed, dilation, None, True)


__all__ = ["conv3x3_forward", "conv3x3_input_grad", "unsupported"]
