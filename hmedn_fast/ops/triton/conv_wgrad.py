"""Weight gradient of a 3x3x3 "same" convolution (stride 1, padding = dilation) on channels-last 3D tensors.

cuDNN's weight-gradient kernels for hmedn_3d_l2's convolutions with 16 or 32 output channels run at 65-86 TFLOP/s
in bf16 (1.75 ms for 64 -> 16 channels at 128^3 on an H100 and an H200; ``benchmarks/results/conv_wgrad_H200.txt``,
``conv_wgrad_nvidia_h100_80gb_hbm3.json``), a tenth of the tensor cores' rate: the GEMM is skinny (M = C_out,
N = 27 C_in, K = every voxel). This kernel: up to 3.3x cuDNN on those shapes, float32 result.

    dW[co, ci, kd, kh, kw] = sum_v gy[v, co] x[v + s, ci] = sum_u gy[u - s, co] x[u, ci],
    s = d (kd - 1, kh - 1, kw - 1)      (terms whose shifted position leaves the volume are zero)

One program owns one ``kd`` plane of taps, a block of input channels and a contiguous range of voxel tiles (split
K): per tile it loads the input ``x`` (BV voxels x C_IN_BLOCK) once and, for each of the 9 (kh, kw) taps, the
shifted output-gradient tile (BV x C_out, the kw neighbours hit the L1 cache), and accumulates ``x_tile^T @
gy_tile`` on the tensor cores in float32, in 9 register accumulators. Shifting the narrow operand (C_out = 16 or 32
channels) instead of the wide one moves up to 4x fewer bytes per tap: 1.3-1.9x faster than shifting the input
tiles on the H100 (``conv_wgrad_nvidia_h100_80gb_hbm3.json``). Partial sums per voxel range go to a float32
buffer that :func:`hmedn_fast.ops.partials.sum_partials` reduces (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hmedn_fast.ops.geometry import same_3x3_geometry_unsupported
from hmedn_fast.ops.partials import sum_partials
from hmedn_fast.ops.strides import voxel_stride
from hmedn_fast.ops.triton.launch import INTERPRET, FastLauncher, cdiv, multiprocessors

MAX_C_IN_BLOCK = 64


BOX_TILES = True  # False keeps the flat tiles in this kernel and in conv_fwd's (benchmarks compare both)


def launch_config(c_in: int, c_out: int, size: tuple[int, int, int] | None = None
                  ) -> tuple[int, int, int, int, int, tuple[int, int] | None]:
    """(voxels per tile, warps, pipelining stages, programs per SM, input channels per program, box or None) for a
    (D, H, W) volume. Flat tiles from a sweep on the H100 (BV 32-128, 4/8 warps, 2/3 stages, 2/4 programs per SM,
    32/64-channel blocks; ``conv_wgrad_nvidia_h100_80gb_hbm3.json``): 32 voxels, 4 warps, 3 stages, 4 programs per SM
    and 64-channel blocks were best or within 5 % of the best for every shape of hmedn_3d_l2 except 16 output
    channels from at most 32 input channels, where 128-voxel tiles, 2 stages, 2 programs per SM and 32-channel
    blocks won. 32-channel blocks are 2-20x slower everywhere else (32 output channels: 0.46 vs 0.047 ms for 160 ->
    32 at 16^3, 5.2 vs 0.11 ms for the dilated 32 -> 32 at 64^3), also where they cover all of C_in.

    In the first class, on volumes with H and W >= 32, tiles are 1 x 4 x 16 boxes with 2 stages (H200 sweep,
    ``benchmarks/results/conv_tiles_nvidia_h200_wgrad.json``: dilated 32 -> 32 at 64^3 0.096 vs 0.112 ms, 64 -> 16
    at 128^3 0.441 vs 0.529; cuDNN 0.189 and 1.782); in the second, boxes were no faster (0.453 vs 0.449 ms)."""
    if c_out == 16 and c_in <= 32:
        return 128, 4, 2, 2, 32, None
    if BOX_TILES and size is not None and min(size[1:]) >= 32:
        return 64, 4, 2, 4, MAX_C_IN_BLOCK, (16, 4)
    return 32, 4, 3, 4, MAX_C_IN_BLOCK, None


@triton.jit
def tile_voxels(t, NV, D, H, W, BV: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr):
    """Tile ``t``'s BV voxels: ``(row, x, y, z, live)``, their flattened (N, D, H, W) index, coordinates and
    whether they exist. BX = 0: BV consecutive voxels; else a box of BV / (BY BX) x BY x BX voxels of one sample,
    whose shifted tiles overlap far more in the L1 cache (boxes are numbered x fastest, then y, z, sample)."""
    if BX == 0:
        row = t * BV + tl.arange(0, BV)
        live = row < NV
        x = row % W
        y = (row // W) % H
        z = (row // (W * H)) % D
    else:
        nbx = tl.cdiv(W, BX)
        nby = tl.cdiv(H, BY)
        nbz = tl.cdiv(D, BV // (BX * BY))
        r = tl.arange(0, BV)
        x = (t % nbx) * BX + r % BX
        y = (t // nbx % nby) * BY + r // BX % BY
        z = (t // (nbx * nby) % nbz) * (BV // (BX * BY)) + r // (BX * BY)
        row = ((t // (nbx * nby * nbz) * D + z) * H + y) * W + x
        live = (x < W) & (y < H) & (z < D) & (row < NV)  # tiles past the last sample's boxes: row >= NV
    return row, x, y, z, live


def tile_count(n: int, d: int, h: int, w: int, block: int, box: tuple[int, int] | None) -> tuple[int, int, int]:
    """``(bx, by, tiles)`` for :func:`tile_voxels`: (0, 0) without a box; ValueError for a box that is not powers
    of two (bx, by) with bx * by dividing ``block``."""
    bx, by = box or (0, 0)
    if not bx:
        return 0, 0, cdiv(n * d * h * w, block)
    if block % (bx * by) or bx & (bx - 1) or by & (by - 1):
        raise ValueError(f"box must be powers of two (bx, by) with bx * by dividing block_voxels {block}, got {box}")
    return bx, by, n * cdiv(w, bx) * cdiv(h, by) * cdiv(d, block // (bx * by))


@triton.jit
def _tap(acc, gy_ptr, row, ok_row, shift, co, xt, GS, F32_DOT: tl.constexpr):
    """acc + xt @ gy[row + shift] for the rows where ``ok_row`` (the shifted position stays inside the volume)."""
    g = tl.load(gy_ptr + (row + shift)[:, None] * GS + co[None, :], mask=ok_row[:, None], other=0.0)
    if F32_DOT:
        g = g.to(tl.float32)
    return tl.dot(xt, g, acc)


@triton.jit
def _wgrad_kernel(x_ptr, gy_ptr, part_ptr, NV, D, H, W, C_IN, DIL, GS, tiles_per_prog,
                  C_OUT: tl.constexpr, C_IN_BLOCK: tl.constexpr, BV: tl.constexpr, F32_DOT: tl.constexpr,
                  BX: tl.constexpr, BY: tl.constexpr):
    split = tl.program_id(0)
    cblock = tl.program_id(1)
    kd = tl.program_id(2)
    ci = cblock * C_IN_BLOCK + tl.arange(0, C_IN_BLOCK)
    ci_ok = ci < C_IN
    co = tl.arange(0, C_OUT)
    sd, sh = (kd - 1) * DIL * H * W, DIL * W
    a00 = tl.zeros([C_IN_BLOCK, C_OUT], tl.float32)  # nine distinct tensors: the interpreter's dot adds in place
    a01 = tl.zeros([C_IN_BLOCK, C_OUT], tl.float32)
    a02 = tl.zeros([C_IN_BLOCK, C_OUT], tl.float32)
    a10 = tl.zeros([C_IN_BLOCK, C_OUT], tl.float32)
    a11 = tl.zeros([C_IN_BLOCK, C_OUT], tl.float32)
    a12 = tl.zeros([C_IN_BLOCK, C_OUT], tl.float32)
    a20 = tl.zeros([C_IN_BLOCK, C_OUT], tl.float32)
    a21 = tl.zeros([C_IN_BLOCK, C_OUT], tl.float32)
    a22 = tl.zeros([C_IN_BLOCK, C_OUT], tl.float32)
    first = split * tiles_per_prog
    for t in range(first, first + tiles_per_prog):
        row, x, y, z, live = tile_voxels(t, NV, D, H, W, BV, BX, BY)
        zz = z - (kd - 1) * DIL
        okz = live & (zz >= 0) & (zz < D)
        xt = tl.load(x_ptr + row[:, None] * C_IN + ci[None, :], mask=live[:, None] & ci_ok[None, :], other=0.0)
        if F32_DOT:  # the interpreter's bf16 dot reads raw bits (Triton 3.9); float32 products of bf16 are exact
            xt = xt.to(tl.float32)
        xt = tl.trans(xt)
        ym, yp = okz & (y + DIL < H), okz & (y >= DIL)  # kh = 0 reads row y + d, kh = 2 row y - d
        xm, xp = x + DIL < W, x >= DIL
        base = row - sd
        a00 = _tap(a00, gy_ptr, base, ym & xm, sh + DIL, co, xt, GS, F32_DOT)
        a01 = _tap(a01, gy_ptr, base, ym, sh, co, xt, GS, F32_DOT)
        a02 = _tap(a02, gy_ptr, base, ym & xp, sh - DIL, co, xt, GS, F32_DOT)
        a10 = _tap(a10, gy_ptr, base, okz & xm, DIL, co, xt, GS, F32_DOT)
        a11 = _tap(a11, gy_ptr, base, okz, 0, co, xt, GS, F32_DOT)
        a12 = _tap(a12, gy_ptr, base, okz & xp, -DIL, co, xt, GS, F32_DOT)
        a20 = _tap(a20, gy_ptr, base, yp & xm, -sh + DIL, co, xt, GS, F32_DOT)
        a21 = _tap(a21, gy_ptr, base, yp, -sh, co, xt, GS, F32_DOT)
        a22 = _tap(a22, gy_ptr, base, yp & xp, -sh - DIL, co, xt, GS, F32_DOT)
    # part: (splits, 27, C_IN, C_OUT) float32; tap = 9 kd + 3 kh + kw
    out = part_ptr + (split * 27 + kd * 9) * C_IN * C_OUT + ci[:, None] * C_OUT + co[None, :]
    m = ci_ok[:, None]
    step = C_IN * C_OUT
    tl.store(out, a00, mask=m)
    tl.store(out + step, a01, mask=m)
    tl.store(out + 2 * step, a02, mask=m)
    tl.store(out + 3 * step, a10, mask=m)
    tl.store(out + 4 * step, a11, mask=m)
    tl.store(out + 5 * step, a12, mask=m)
    tl.store(out + 6 * step, a20, mask=m)
    tl.store(out + 7 * step, a21, mask=m)
    tl.store(out + 8 * step, a22, mask=m)


_KERNEL = FastLauncher(_wgrad_kernel)


def same_3x3_unsupported(inp: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> str | None:
    """Why a convolution is not the shape the automatic dispatch sends to the Triton convolution kernels (a "same"
    3x3x3 one, :func:`same_3x3_geometry_unsupported`, with 16 or 32 output channels), or None. Dtype and layout are
    each kernel's own checks."""
    reason = same_3x3_geometry_unsupported(inp, weight, stride, padding, dilation, groups)
    if reason is None and weight.shape[0] not in (16, 32):
        return "16 or 32 output channels"
    return reason


def unsupported(grad: Tensor, inp: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> str | None:
    """Why :func:`conv3x3_wgrad` cannot take these arguments, or None."""
    reason = same_3x3_unsupported(inp, weight, stride, padding, dilation, groups)
    if reason is not None:
        return reason
    if grad.dtype not in (torch.bfloat16, torch.float16) or inp.dtype != grad.dtype:
        return "bf16 / fp16 input and gradient of one dtype"
    if not inp.is_contiguous(memory_format=torch.channels_last_3d) or voxel_stride(grad) is None:
        return "a channels-last contiguous input and a gradient with channels innermost and voxels at one stride"
    if inp.numel() >= 2**31 or grad.numel() >= 2**31:
        return "fewer than 2**31 elements"
    return None


def conv3x3_wgrad(grad: Tensor, inp: Tensor, dilation: int, num_programs: int | None = None,
                  block_voxels: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                  cin_block: int | None = None, box: tuple[int, int] | None = None) -> Tensor:
    """Weight gradient (C_out, C_in, 3, 3, 3), float32, of ``conv3d(inp, w, padding=dilation, dilation=dilation)``.

    Args:
        grad: (N, C_out, D, H, W) output gradient, bf16/fp16, C_out 16 or 32, channels-last contiguous or a channel
            slice of such a tensor (channels innermost, voxels at one stride).
        inp: (N, C_in, D, H, W) the convolution's input, same dtype and layout.
        dilation: the convolution's dilation (= its padding).
        num_programs: programs to spread the voxels over (default: :func:`launch_config`'s per SM, or 4 with the
            interpreter).
        block_voxels, num_warps, num_stages, cin_block: tile size (voxels per dot, a power of two >= 16), warps per
            program, software-pipelining stages of the voxel loop and input channels per program (a power of two
            >= 16); None takes :func:`launch_config`'s (its box too, unless ``block_voxels`` is given). Larger tiles
            and stages can exceed the shared memory.
        box: None (each tile is ``block_voxels`` consecutive voxels), or ``(bx, by)``: each tile a box of
            ``block_voxels / (bx by)`` x by x bx voxels (D x H x W) of one sample (powers of two).
    Returns:
        (C_out, C_in, 3, 3, 3) float32.
    """
    n, c_in, d, h, w = inp.shape
    c_out = grad.shape[1]
    nv = n * d * h * w
    gs = voxel_stride(grad)
    if gs is None:
        raise ValueError(f"grad must have channels innermost and voxels at one stride, got strides {grad.stride()}")
    bv, warps, stages, per_sm, cb, auto_box = launch_config(c_in, c_out, (d, h, w))
    if block_voxels is None and box is None:
        box = auto_box
    block_voxels, num_warps, num_stages = block_voxels or bv, num_warps or warps, num_stages or stages
    cin_block = cin_block or cb
    cblocks = cdiv(c_in, cin_block)
    bx, by, tiles = tile_count(n, d, h, w, block_voxels, box)
    if num_programs is None:
        num_programs = 4 if INTERPRET else per_sm * multiprocessors(inp.get_device())
    splits = max(1, min(tiles, num_programs // (3 * cblocks)))
    per_prog = cdiv(tiles, splits)
    splits = cdiv(tiles, per_prog)
    part = torch.empty((splits, 27, c_in, c_out), dtype=torch.float32, device=inp.device)
    _KERNEL((splits, cblocks, 3), inp, grad, part, nv, d, h, w, c_in, int(dilation), gs, per_prog,
            C_OUT=c_out, C_IN_BLOCK=cin_block, BV=block_voxels, F32_DOT=INTERPRET, BX=bx, BY=by, num_warps=num_warps,
            num_stages=num_stages)
    return sum_partials(part, (2, 1, 0)).view(c_out, c_in, 3, 3, 3)  # (tap, in, out) summed into (out, in, tap)


__all__ = ["conv3x3_wgrad", "launch_config", "same_3x3_geometry_unsupported", "same_3x3_unsupported", "unsupported"]
