"""Triton kernels of ``conv1x1_add`` (:mod:`hmedn_fast.ops.conv1x1`): ``acc + conv1x1(x, w) (+ bias)`` on tensors
whose channels are innermost and whose voxels (N and the spatial axes flattened) sit at one stride.

A 1x1 convolution of such a tensor is a GEMM ``X (V x C_in) @ W^T (C_in x C_out)`` whose K (C_in) is a few dozen:
it moves bytes, it barely computes. The forward reads a tile of X and of the running sum ``acc`` and writes their
sum with the product in one pass (cuDNN's 1x1 convolution writes the product, then an add kernel reads it back
with ``acc``). The backward reads the output gradient G and X once per tile and does both gradients there:
``dX = G @ W`` (written per tile) and ``dW = G^T @ X`` (and ``db = sum G``) accumulated in registers over the
program's tiles, one float32 partial per program, summed in a fixed order (:func:`hmedn_fast.ops.partials.
sum_partials`: deterministic, no atomics, no workspace that outlives the call). cuDNN's 1x1 weight gradient was 36.7 us
per 32 -> 32 channel call at 64^3 on the H200 (stop 31 profile in ``docs/decisions/blocks.md``) where reading G and X
takes ~8 us; one term's forward + backward 75.8 us (cuDNN + add) vs 42.0 us (these kernels, with torch's sum of the
partials) in one process (stop 32, ``benchmarks/results/ab_fusion_norm_nvidia_h200_s32.json``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hmedn_fast.ops.partials import sum_partials
from hmedn_fast.ops.triton.launch import INTERPRET, FastLauncher, cdiv, multiprocessors, next_power_of_2

BLOCK_V = 128  # voxels per tile
PROGRAMS_PER_SM = 2  # backward: programs per SM, each summing its tiles' weight gradient in registers (H200, stop 32,
# one 32 -> 32 term at 64^3, forward + backward: 34.4 us at 2, 34.8 at 1, 42.2 at 4, 52.2 at 8 with 128-voxel tiles;
# 64-voxel tiles 36.3-48.3: ab2_fusion_norm_nvidia_h200_s32.json)
NUM_WARPS = 4


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, acc_ptr, out_ptr, NV, XS, AS, CI, CO, WS_O, WS_I,
                HAS_ACC: tl.constexpr, HAS_BIAS: tl.constexpr, BCI: tl.constexpr, BCO: tl.constexpr,
                BV: tl.constexpr, F32_DOT: tl.constexpr):
    """``out[v, :] = x[v, :] @ w^T (+ bias) (+ acc[v, :])`` for one tile of BV voxels; out is dense (stride CO)."""
    rows = tl.program_id(0) * BV + tl.arange(0, BV)
    rm = rows < NV
    ci = tl.arange(0, BCI)
    co = tl.arange(0, BCO)
    x = tl.load(x_ptr + rows[:, None] * XS + ci[None, :], mask=rm[:, None] & (ci[None, :] < CI), other=0.0)
    w = tl.load(w_ptr + co[:, None] * WS_O + ci[None, :] * WS_I, mask=(co[:, None] < CO) & (ci[None, :] < CI),
                other=0.0).to(x.dtype)  # the weight rounded to the compute dtype, as autocast's cast
    if F32_DOT:  # the interpreter's bf16 dot reads raw bits; float32 products of bf16 / fp16 values are exact
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    y = tl.dot(x, tl.trans(w))
    om = rm[:, None] & (co[None, :] < CO)
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=co < CO, other=0.0).to(out_ptr.dtype.element_ty)  # autocast rounds it too
        y += bias.to(tl.float32)[None, :]
    if HAS_ACC:
        y += tl.load(acc_ptr + rows[:, None] * AS + co[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * CO + co[None, :], y.to(out_ptr.dtype.element_ty), mask=om)


@triton.jit
def _bwd_kernel(x_ptr, w_ptr, g_ptr, dx_ptr, part_ptr, NV, XS, GS, CI, CO, WS_O, WS_I, tiles_per_prog,
                NEED_DX: tl.constexpr, ADD_DX: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                BCI: tl.constexpr, BCO: tl.constexpr, BV: tl.constexpr, F32_DOT: tl.constexpr):
    """Tiles ``p * tiles_per_prog ...`` of program p: ``dx = g @ w`` (dense, stride CI; with ADD_DX added to what dx
    holds, the float32 sum rounded once) per tile, and
    ``part[p] = (g^T @ x, sum g)`` over them: part is (programs, BCO, BCI + 1) float32, column BCI the bias sum."""
    p = tl.program_id(0)
    ci = tl.arange(0, BCI)
    co = tl.arange(0, BCO)
    com, cim = co < CO, ci < CI
    w = tl.load(w_ptr + co[:, None] * WS_O + ci[None, :] * WS_I, mask=com[:, None] & cim[None, :], other=0.0)
    w = w.to(g_ptr.dtype.element_ty)
    if F32_DOT:
        w = w.to(tl.float32)
    acc_w = tl.zeros([BCO, BCI], tl.float32)
    acc_b = tl.zeros([BCO], tl.float32)
    first = p * tiles_per_prog
    for t in range(first, first + tiles_per_prog):
        rows = t * BV + tl.arange(0, BV)
        rm = rows < NV
        g = tl.load(g_ptr + rows[:, None] * GS + co[None, :], mask=rm[:, None] & com[None, :], other=0.0)
        if NEED_B:
            acc_b += tl.sum(g.to(tl.float32), axis=0)
        if F32_DOT:
            g = g.to(tl.float32)
        if NEED_DX:
            dx = tl.dot(g, w)
            dx_at = dx_ptr + rows[:, None] * CI + ci[None, :]
            if ADD_DX:
                dx += tl.load(dx_at, mask=rm[:, None] & cim[None, :], other=0.0).to(tl.float32)
            tl.store(dx_at, dx.to(dx_ptr.dtype.element_ty), mask=rm[:, None] & cim[None, :])
        if NEED_W:
            x = tl.load(x_ptr + rows[:, None] * XS + ci[None, :], mask=rm[:, None] & cim[None, :], other=0.0)
            if F32_DOT:
                x = x.to(tl.float32)
            acc_w = tl.dot(tl.trans(g), x, acc_w)
    if NEED_W or NEED_B:
        out = part_ptr + p * BCO * (BCI + 1) + co * (BCI + 1)
        tl.store(out[:, None] + ci[None, :], acc_w)
        tl.store(out + BCI, acc_b)


_FWD = FastLauncher(_fwd_kernel)
_BWD = FastLauncher(_bwd_kernel)


def channels_innermost_empty(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised (N, C, *spatial) tensor of ``like``'s dtype and device with channels innermost and voxels
    dense (channels-last for 2D and 3D)."""
    return torch.empty((shape[0], *shape[2:], shape[1]), device=like.device, dtype=like.dtype).movedim(-1, 1)


def dense_like_dx(t: Tensor, x: Tensor) -> bool:
    """Whether ``t`` can be :func:`backward`'s ``add_to`` for input ``x``: x's shape, dtype and device, channels
    innermost with the voxels dense (channels-last)."""
    return (t.shape == x.shape and t.dtype == x.dtype and t.device == x.device
            and t.movedim(1, -1).is_contiguous())


def _blocks(c_in: int, c_out: int) -> tuple[int, int]:
    return max(16, next_power_of_2(c_in)), max(16, next_power_of_2(c_out))


def forward(acc: Tensor | None, x: Tensor, xs: int, acc_s: int, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``acc + conv1x1(x, weight) + bias`` as a new tensor in x's dtype, channels innermost (channels-last).

    Args:
        acc: (N, C_out, *spatial) or None, voxels at stride ``acc_s``, channels innermost.
        x: (N, C_in, *spatial) bf16 / fp16, voxels at stride ``xs``, channels innermost.
        weight: (C_out, C_in, 1, ...) any float dtype (rounded to x's dtype in the kernel); bias: (C_out,) or None.
    """
    n, c_in = x.shape[:2]
    c_out = weight.shape[0]
    nv = x.numel() // c_in
    out = channels_innermost_empty((n, c_out, *x.shape[2:]), x)
    bci, bco = _blocks(c_in, c_out)
    _FWD((cdiv(nv, BLOCK_V),), x, weight, weight if bias is None else bias, x if acc is None else acc, out, nv, xs,
         acc_s, c_in, c_out, weight.stride(0), weight.stride(1), HAS_ACC=acc is not None, HAS_BIAS=bias is not None,
         BCI=bci, BCO=bco, BV=BLOCK_V, F32_DOT=INTERPRET, num_warps=NUM_WARPS)
    return out


def backward(g: Tensor, gs: int, x: Tensor, xs: int, weight: Tensor, need_x: bool, need_w: bool, need_b: bool,
             add_to: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx in x's dtype, channels innermost, dweight (C_out, C_in) float32, dbias (C_out,) float32), None where
    not needed. g: (N, C_out, *spatial) in x's dtype, voxels at stride ``gs``, channels innermost. ``add_to``: None,
    or a tensor like dx (x's shape and dtype, channels innermost, voxels dense: :func:`dense_like_dx`) that dx is
    added into (each element's float32 sum rounded once) and returned as dx."""
    c_in, c_out = x.shape[1], g.shape[1]
    nv = x.numel() // c_in
    bci, bco = _blocks(c_in, c_out)
    dx = None
    if need_x:
        dx = channels_innermost_empty(tuple(x.shape), x) if add_to is None else add_to
    tiles = cdiv(nv, BLOCK_V)
    programs = tiles if not (need_w or need_b) else min(
        tiles, 3 if INTERPRET else PROGRAMS_PER_SM * multiprocessors(x.get_device()))
    per_prog = cdiv(tiles, programs)
    programs = cdiv(tiles, per_prog)
    part = torch.empty((programs, bco, bci + 1) if need_w or need_b else (1,), device=x.device, dtype=torch.float32)
    _BWD((programs,), x, weight, g, x if dx is None else dx, part, nv, xs, gs, c_in, c_out, weight.stride(0),
         weight.stride(1), per_prog, NEED_DX=need_x, ADD_DX=need_x and add_to is not None, NEED_W=need_w,
         NEED_B=need_b, BCI=bci, BCO=bco, BV=BLOCK_V, F32_DOT=INTERPRET, num_warps=NUM_WARPS)
    if not (need_w or need_b):
        return dx, None, None
    total = sum_partials(part)
    return dx, total[:c_out, :c_in] if need_w else None, total[:c_out, bci] if need_b else None
