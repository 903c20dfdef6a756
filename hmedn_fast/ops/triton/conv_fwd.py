"""Forward of a 3x3x3 "same" convolution (stride 1, padding = dilation) with 16 or 32 output channels on
channels-last 3D tensors (implicit GEMM on the tensor cores).

cuDNN runs hmedn_3d_l2's full-resolution convolutions with 16 output channels (the dense layers of the first
encoder and last decoder stage, the stem, the contour head) through a 256x32 implicit-GEMM tile: half of its
N tile is padding, and the layers reach 57-138 TFLOP/s in bf16 on an H200 (7.3 ms of every lean training step).
Here the N tile is exactly C_out:

    y[v, co] = sum_{tap, ci} x[v + d (kd - 1, kh - 1, kw - 1), ci] w[co, ci, kd, kh, kw]     (zero outside)

One program owns BM voxels: consecutive ones of the flattened (N, D, H, W) ("flat" tiles), or a box of
BM / (BY BX) x BY x BX voxels of one sample (box tiles, whose 27 shifted tiles overlap far more in the L1 cache);
its loop runs over the 27 taps times the C_in chunks of BK channels, loading the shifted input tile (BM x BK) and
the packed weights (BK x C_out) and accumulating in float32 registers; one rounding to the output dtype.

Measured (H200 sweep of the flat tiles, ``benchmarks/results/conv_fwd_H200.txt``): 1.48x cuDNN for 16 -> 16 channels
and 1.11x for 48 -> 16 at 128^3, 0.85-1.0x for the other shapes: with N = 16 every loaded input element feeds only
16 multiply-adds, so moving the shifted input tiles, not the tensor cores, bounds it. Box tiles (stop 26,
``conv_tiles_nvidia_h200_sweep*.json``): 16 -> 16 at 128^3 2.2x cuDNN. ``hmedn_fast.ops.conv`` times both
backends per shape (``hmedn_fast.ops.measured``) and keeps the faster.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from hmedn_fast.ops.geometry import pack_taps
from hmedn_fast.ops.strides import voxel_stride
from hmedn_fast.ops.triton import conv_wgrad
from hmedn_fast.ops.triton.conv_wgrad import (same_3x3_geometry_unsupported, same_3x3_unsupported, tile_count,
                                              tile_voxels)
from hmedn_fast.ops.triton.launch import INTERPRET, FastLauncher, cdiv, next_power_of_2


def launch_config(c_in: int, c_out_block: int = 16,
                  size: tuple[int, int, int] | None = None) -> tuple[int, int, int, int, tuple[int, int] | None]:
    """(voxels per program, input channels per step, warps, pipelining stages, box or None) for ``c_in`` shifted
    channels, ``c_out_block`` output channels per program and a (D, H, W) volume.

    Boxes (:func:`conv3x3_forward`'s ``box``) of 4 x 8 x 8 voxels, 4 warps, 3 stages for up to 32 shifted and 64
    output channels on volumes of at least 4 x 32 x 32: in the H200 sweeps (``benchmarks/results/conv_tiles_nvidia_
    h200_sweep*.json``) 16 -> 16 at 128^3 0.221 vs 0.297 ms (cuDNN 0.475), the input gradient of 32 -> 16 (16
    shifted, 32 out) 0.245 vs 0.337, the dilated 32 -> 32 at 64^3 0.062 vs 0.070 (cuDNN 0.075), 32 -> 16 0.421 vs
    0.439, never slower than the flat tiles. Else flat tiles (consecutive voxels), the best of the earlier H200 sweep
    (``conv_fwd_H200.txt``): 16 -> 16: 128/16/4/4; 48 -> 16: 256/64/8/2; 128 voxels, up to 64 channels, 4 warps, 3
    stages otherwise. ``conv_wgrad.BOX_TILES`` off: flat tiles everywhere."""
    bk = 16 if c_in <= 16 else min(64, next_power_of_2(c_in))
    boxable = size is not None and size[0] >= 4 and min(size[1:]) >= 32
    if conv_wgrad.BOX_TILES and boxable and c_in <= 32 and c_out_block <= 64:
        return 256, bk, 4, 3, (8, 8)
    if c_in <= 16:
        return 128, bk, 4, 4, None
    if c_in > 32:
        return 256, bk, 8, 2, None
    return 128, bk, 4, 3, None


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, y_ptr, NV, D, H, W, C_IN, DIL, XS, YS, C_OUT: tl.constexpr, CO_BLOCK: tl.constexpr,
                BM: tl.constexpr, BK: tl.constexpr, NCHUNK: tl.constexpr, F32_DOT: tl.constexpr,
                NUM_STAGES: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr):
    row, x, y, z, live = tile_voxels(tl.program_id(0), NV, D, H, W, BM, BX, BY)
    ck = tl.arange(0, BK)
    if C_OUT == CO_BLOCK:  # one block of output channels: no channel mask
        co = tl.arange(0, CO_BLOCK)
        co_ok = tl.full([CO_BLOCK], 1, tl.int1)
    else:
        co = tl.program_id(1) * CO_BLOCK + tl.arange(0, CO_BLOCK)
        co_ok = co < C_OUT
    acc = tl.zeros([BM, CO_BLOCK], tl.float32)
    for k in tl.range(0, 27 * NCHUNK, num_stages=NUM_STAGES):
        tap = k // NCHUNK
        ci = (k % NCHUNK) * BK + ck
        ci_ok = ci < C_IN
        dz = (tap // 9 - 1) * DIL
        dy = (tap // 3 % 3 - 1) * DIL
        dx = (tap % 3 - 1) * DIL
        ok = live & (z + dz >= 0) & (z + dz < D) & (y + dy >= 0) & (y + dy < H) & (x + dx >= 0) & (x + dx < W)
        src = row + (dz * H + dy) * W + dx
        a = tl.load(x_ptr + src[:, None] * XS + ci[None, :], mask=ok[:, None] & ci_ok[None, :], other=0.0)
        b = tl.load(w_ptr + (tap * C_IN + ci)[:, None] * C_OUT + co[None, :], mask=ci_ok[:, None] & co_ok[None, :],
                    other=0.0)
        if F32_DOT:  # the interpreter's bf16 dot reads raw bits (Triton 3.9); float32 products of bf16 are exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    tl.store(y_ptr + row[:, None] * YS + co[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=live[:, None] & co_ok[None, :])


_KERNEL = FastLauncher(_fwd_kernel)


def unsupported(inp: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> str | None:
    """Why :func:`conv3x3_forward` cannot take these arguments, or None."""
    reason = same_3x3_unsupported(inp, weight, stride, padding, dilation, groups)
    if reason is not None:
        return reason
    if inp.dtype not in (torch.bfloat16, torch.float16) or not weight.is_floating_point():
        return "a bf16 / fp16 input and a floating-point weight"
    if voxel_stride(inp) is None:
        return "an input with channels innermost and voxels at one stride (channels-last, or a channel slice of it)"
    if inp.numel() >= 2**31 or math.prod(inp.shape[2:]) * inp.shape[0] * weight.shape[0] >= 2**31:
        return "fewer than 2**31 elements"
    return None


def out_channel_block(c_out: int) -> int:
    """Output channels per program (the dots' N tile): all of them for 16 or 32; else 64 or 128, whichever pads
    C_out least, 128 on a tie (fewer re-reads of the input tile): 48 -> 64, 80 and 96 -> 128, 144 and 160 -> 64.
    In the H100 input-gradient sweep (``conv_dgrad_nvidia_h100_80gb_hbm3.json``) one 128-channel block with 8 warps
    took 16 -> 80 channels at 128^3 from 0.92 to 0.52 ms (two 64-channel blocks, 4 warps)."""
    if c_out in (16, 32):
        return c_out
    if c_out <= 64:
        return max(16, next_power_of_2(c_out))
    return min((64, 128), key=lambda b: (cdiv(c_out, b) * b, -b))


def conv3x3_forward(inp: Tensor, weight: Tensor, dilation: int, block_voxels: int | None = None,
                    block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                    co_block: int | None = None, out: Tensor | None = None,
                    box: tuple[int, int] | None = None) -> Tensor:
    """``conv3d(inp, weight, padding=dilation, dilation=dilation)`` (no bias), channels-last output.

    Args:
        inp: (N, C_in, D, H, W) bf16/fp16 with channels innermost and voxels at one stride: channels-last
            contiguous, or a channel slice of such a tensor (see :func:`unsupported`).
        weight: (C_out, C_in, 3, 3, 3) floating point, any strides, rounded to inp's dtype. The automatic dispatch
            sends C_out 16 or 32 here; other counts run in blocks of :func:`out_channel_block` output channels per
            program.
        dilation: the convolution's dilation (= its padding); negative: every tap's offset negated (the kernel
            flipped, as the input gradient needs).
        block_voxels, block_k, num_warps, num_stages, co_block: voxels per program (power of two >= 16), input
            channels per step (power of two >= 16), warps, pipelining stages, output channels per program (power
            of two >= 16); None takes :func:`launch_config`'s / :func:`out_channel_block`'s (its box too, unless
            ``block_voxels`` is given).
        box: None (each program takes ``block_voxels`` consecutive voxels), or ``(bx, by)``: each program takes a
            box of ``block_voxels / (bx by)`` x by x bx voxels (D x H x W) of one sample (powers of two).
        out: None, or an (N, C_out, D, H, W) tensor of inp's dtype and device with channels innermost and voxels at
            one stride (a channel slice of a channels-last buffer, say) that the result is written into.
    Returns:
        (N, C_out, D, H, W) in inp's dtype, channels-last (``out`` when given); float32 accumulation, one rounding.
    """
    n, c_in, d, h, w = inp.shape
    c_out = weight.shape[0]
    nv = n * d * h * w
    co_block = co_block or out_channel_block(c_out)
    bm, bk, warps, stages, auto_box = launch_config(c_in, co_block, (d, h, w))
    if block_voxels is None and box is None:
        box = auto_box
    bm, bk = block_voxels or bm, block_k or bk
    bx, by, programs = tile_count(n, d, h, w, bm, box)
    if co_block == 128 and bm >= 128:  # a 128 x 128 float32 accumulator needs 8 warps' registers (the dgrad sweep)
        warps, stages = 8, 3
    if out is None:
        out = torch.empty((n, c_out, d, h, w), dtype=inp.dtype, device=inp.device,
                          memory_format=torch.channels_last_3d)
    xs, ys = voxel_stride(inp), voxel_stride(out)
    if xs is None:
        raise ValueError(f"inp must have channels innermost and voxels at one stride, got strides {inp.stride()}")
    if tuple(out.shape) != (n, c_out, d, h, w) or out.dtype != inp.dtype or out.device != inp.device or ys is None:
        raise ValueError(f"out must be a {(n, c_out, d, h, w)} {inp.dtype} tensor on {inp.device} with channels "
                         f"innermost, got {tuple(out.shape)} {out.dtype} on {out.device}, strides {out.stride()}")
    if nv == 0:
        return out
    _KERNEL((programs, cdiv(c_out, co_block)), inp, pack_taps(weight, inp.dtype, in_first=True), out, nv, d, h, w,
            c_in, int(dilation), xs, ys, C_OUT=c_out, CO_BLOCK=co_block, BM=bm, BK=bk, NCHUNK=cdiv(c_in, bk),
            F32_DOT=INTERPRET, NUM_STAGES=num_stages or stages, BX=bx, BY=by, num_warps=num_warps or warps)
    return out


def input_grad_unsupported(grad: Tensor, weight: Tensor, input_shape, stride, padding, dilation,
                           groups: int) -> str | None:
    """Why :func:`conv3x3_input_grad` cannot give the input gradient of this convolution, or None."""
    reason = same_3x3_geometry_unsupported(grad, weight, stride, padding, dilation, groups)
    if reason is not None:
        return reason
    if tuple(input_shape[2:]) != tuple(grad.shape[2:]):
        return "padding equal to one dilation for every axis ('same' output)"
    if grad.dtype not in (torch.bfloat16, torch.float16):
        return "a bf16 / fp16 gradient"
    if voxel_stride(grad) is None:
        return "a gradient with channels innermost and voxels at one stride (channels-last, or a channel slice of it)"
    if grad.numel() >= 2**31 or math.prod(input_shape) >= 2**31:
        return "fewer than 2**31 elements"
    return None


def conv3x3_input_grad(grad: Tensor, weight: Tensor, dilation: int, **config) -> Tensor:
    """Input gradient of ``conv3d(x, weight, padding=dilation, dilation=dilation)``:

        gx[u, ci] = sum_{tap, co} gy[u - s_tap, co] w[co, ci, tap],

    the same "same" convolution of the output gradient with the channel axes swapped and every tap's offset
    negated: the forward kernel with dilation ``-dilation`` (no flipped copy of the kernel). The shifted operand is
    the narrow gradient (the layer's C_out, 16 or 32 channels in hmedn_3d_l2) and the output's C_in channels are
    the dots' N tile (:func:`out_channel_block`).

    Args:
        grad: (N, C_out, D, H, W) bf16/fp16, channels-last contiguous or a channel slice of such a tensor (the
            lean dense block passes its gradient buffer's slice: no dense copy). weight: (C_out, C_in, 3, 3, 3) (rounded
            to grad's dtype). dilation: the convolution's (positive). config: launch options of
            :func:`conv3x3_forward`.
    Returns:
        (N, C_in, D, H, W) in grad's dtype, channels-last; float32 accumulation, one rounding.
    """
    return conv3x3_forward(grad, weight.transpose(0, 1), -int(dilation), **config)


__all__ = ["conv3x3_forward", "conv3x3_input_grad", "input_grad_unsupported", "launch_config", "out_channel_block",
           "unsupported"]
