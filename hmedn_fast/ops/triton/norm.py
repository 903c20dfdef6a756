"""Triton kernels of the fused ``norm (+ residual) + ReLU`` op (:mod:`hmedn_fast.ops.norm_act`).

Every tensor is addressed as a strided ``(N, C, S)`` view, S the flattened spatial size, so one kernel serves
NC* (strides ``(C*S, S, 1)``) and channels-last (``(S*C, 1, C)``) layouts, 2D and 3D; Triton specialises
the unit stride, so loads are coalesced along whichever axis is contiguous.

A *statistics set* is what one mean and variance are taken over: batch norm, channel c over N x S; instance
norm, (n, c) over S; group norm, (n, group) over C/G channels x S; running statistics, channel c. Per-set
values live in ``(NS, K, C)`` float32 arrays, ``NS = N`` when sets differ across samples (instance, group)
and 1 otherwise (n stride 0).

Three launches forward and three backward, nothing but ``torch.empty`` between them (and a copy of an
input whose spatial axes do not flatten to one stride):

forward
  1. ``_reduce_kernel``: x -> per (n, chunk of S, c) mean and M2 (sum of squared deviations; float32,
     shifted by the chunk's first value). Skipped when normalising with running statistics.
  2. ``_stats_kernel`` (one program per set's channels, a few programs in all): combines the chunks of each
     set in a fixed order with Chan's parallel formula, writes ``coef[ns, :, c] = (a, b, mean, rstd)``,
     ``a = rstd * weight``, ``b = bias``, and updates ``running_mean`` / ``running_var`` in place
     (unbiased variance, averaged over the sets of a channel, as ``F.batch_norm`` / ``F.instance_norm``).
  3. ``_forward_kernel``: ``y = relu((x - mean) a + b (+ r))``.

backward (``z`` recomputed from x (+ r), so neither ``z`` nor ``y`` is stored; ``g = dy [z > 0]``)
  1. ``_reduce_kernel`` (``BACKWARD``): per (n, chunk, c) ``sum g`` and ``sum g (x - mean)``.
  2. ``_grad_stats_kernel``: per set, ``gb``, ``gd`` of ``dx = a g + gb (x - mean) + gd`` (zero with running
     statistics), and the weight / bias gradients written in their dtype.
  3. ``_backward_kernel``: dx (and ``dr = g`` when the residual needs a gradient).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hmedn_fast.ops.strides import flat_spatial_stride
from hmedn_fast.ops.triton.launch import FastLauncher, cdiv, next_power_of_2

BLOCK_S = 128  # voxels per tile of the apply kernels
MAX_BLOCK_C = 64
TARGET_PROGRAMS = 528  # programs of the reduce pass: S is split into chunks until about this many (H200, stop 32:
# norm fwd + bwd of 32 x 64^3 bf16 47.0 / 67.6 us without / with a residual at 528, 49.9 / 70.6 at 1024, 60.7 / 72.9
# at 264: benchmarks/results/ab_fusion_norm_nvidia_h200_s32.json)
REDUCE_BLOCK_S = 128  # voxels per tile of the reduce pass (chunks are multiples of it)
REDUCE_WARPS = 8  # H200, stop 32 (ab2_fusion_norm_nvidia_h200_s32.json): 44.6 / 64.9 us vs 48.2 / 69.8 with 4 warps;
# 64- and 256-voxel tiles no better; the 3D pathway's lean step graphed 5.48 vs 5.57 ms
STATS_TILE = 4096  # elements of the (rows x channels) tile the stats kernels combine per step
MAX_STATS_CHANNELS = 2  # channels per program of the stats kernels (batch / instance / running statistics):
# few, so the programs are many and each combines its chunks in one or two steps (the kernels are latency-bound)


# ------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _pre_activation(x_ptr, r_ptr, coef_ptr, n, c, s, C, cn, xs_n, xs_c, xs_s, rs_n, rs_c, rs_s, mask,
                    HAS_RES: tl.constexpr):
    """``x - mean`` and ``z = (x - mean) a + b (+ r)`` as float32 for a ``[BLOCK_C, BLOCK_S]`` tile."""
    cm = c < C
    a = tl.load(coef_ptr + n * cn + c, mask=cm, other=0.0)
    b = tl.load(coef_ptr + n * cn + C + c, mask=cm, other=0.0)
    mean = tl.load(coef_ptr + n * cn + 2 * C + c, mask=cm, other=0.0)
    x = tl.load(x_ptr + n * xs_n + c[:, None] * xs_c + s[None, :] * xs_s, mask=mask, other=0.0).to(tl.float32)
    xm = x - mean[:, None]
    z = xm * a[:, None] + b[:, None]
    if HAS_RES:
        z += tl.load(r_ptr + n * rs_n + c[:, None] * rs_c + s[None, :] * rs_s, mask=mask, other=0.0).to(tl.float32)
    return xm, z


@triton.jit
def _reduce_kernel(x_ptr, r_ptr, dy_ptr, coef_ptr, part_ptr, C, S, chunk, SPLIT, cn,
                   xs_n, xs_c, xs_s, rs_n, rs_c, rs_s, ds_n, ds_c, ds_s,
                   BACKWARD: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """``part[n, split, 0:2, c]`` over one chunk of S: forward (chunk mean, chunk M2), backward
    (``sum g``, ``sum g (x - mean)``)."""
    split, cb, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    start = split * chunk
    stop = tl.minimum(start + chunk, S)
    acc1 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    if BACKWARD:
        for s0 in range(start, stop, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cm[:, None] & (s[None, :] < S)
            xm, z = _pre_activation(x_ptr, r_ptr, coef_ptr, n, c, s, C, cn, xs_n, xs_c, xs_s, rs_n, rs_c, rs_s,
                                    mask, HAS_RES)
            g = tl.load(dy_ptr + n * ds_n + c[:, None] * ds_c + s[None, :] * ds_s, mask=mask, other=0.0)
            g = g.to(tl.float32)
            if RELU:
                g = tl.where(z > 0, g, 0.0)
            acc1 += g
            acc2 += g * xm
        first = tl.sum(acc1, axis=1)
        second = tl.sum(acc2, axis=1)
    else:
        shift = tl.load(x_ptr + n * xs_n + c * xs_c + start * xs_s, mask=cm, other=0.0).to(tl.float32)
        for s0 in range(start, stop, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cm[:, None] & (s[None, :] < S)
            x = tl.load(x_ptr + n * xs_n + c[:, None] * xs_c + s[None, :] * xs_s, mask=mask, other=0.0)
            d = tl.where(mask, x.to(tl.float32) - shift[:, None], 0.0)
            acc1 += d
            acc2 += d * d
        count = (stop - start).to(tl.float32)
        s1 = tl.sum(acc1, axis=1)
        first = shift + s1 / count
        second = tl.maximum(tl.sum(acc2, axis=1) - s1 * (s1 / count), 0.0)
    out = part_ptr + ((n * SPLIT + split) * 2) * C + c
    tl.store(out, first, mask=cm)
    tl.store(out + C, second, mask=cm)


@triton.jit
def _part_rows(part_ptr, ns, rows, r0, C, c, cm, BLOCK_R: tl.constexpr):
    """Rows ``r0 .. r0 + BLOCK_R`` of set ``ns`` of the ``part`` sums, channels ``c``: the pair of ``[BLOCK_R,
    BLOCK_G]`` partials stored per row (0 where masked), the row indices and the validity mask."""
    r = r0 + tl.arange(0, BLOCK_R)
    valid = (r[:, None] < rows) & cm[None, :]
    p = part_ptr + ((ns * rows + r[:, None]) * 2) * C + c[None, :]
    return tl.load(p, mask=valid, other=0.0), tl.load(p + C, mask=valid, other=0.0), r, valid


@triton.jit
def _over_set(v, GROUP: tl.constexpr):
    """Per-channel ``[BLOCK_G]`` values summed over the statistics set: the whole group, or each channel."""
    if GROUP:
        v = tl.zeros_like(v) + tl.sum(v, axis=0)
    return v


@triton.jit
def _stats_kernel(part_ptr, w_ptr, bias_ptr, rm_ptr, rv_ptr, coef_ptr, C, S, chunk, SPLIT, NPER, NSETS, CW,
                  count, unbias, eps, momentum, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                  BATCH_STATS: tl.constexpr, UPDATE: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """Channels ``[pid * CW, pid * CW + CW)`` of every set ns < NSETS: ``coef[ns, 0:4, c] = (a, b, mean, rstd)``.

    A set's chunks are the ``NPER * SPLIT`` rows ``ns * NPER * SPLIT + r`` of ``part`` (and, for GROUP, its CW
    channels); row r holds ``min(chunk, S - (r % SPLIT) chunk)`` samples per channel. Without BATCH_STATS the
    running statistics are the mean and variance.
    """
    j = tl.arange(0, BLOCK_G)
    c = tl.program_id(0) * CW + j
    cm = (j < CW) & (c < C)
    gamma = tl.load(w_ptr + c, mask=cm, other=1.0).to(tl.float32) if HAS_W else tl.full([BLOCK_G], 1.0, tl.float32)
    beta = tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32) if HAS_B else tl.zeros([BLOCK_G], tl.float32)
    rows = NPER * SPLIT
    mean_sum = tl.zeros([BLOCK_G], tl.float32)
    var_sum = tl.zeros([BLOCK_G], tl.float32)
    for ns in range(0, NSETS):
        if BATCH_STATS:
            total = tl.zeros([BLOCK_G], tl.float32)
            mean = tl.zeros([BLOCK_G], tl.float32)
            m2 = tl.zeros([BLOCK_G], tl.float32)
            for r0 in range(0, rows, BLOCK_R):
                chunk_mean, chunk_m2, r, valid = _part_rows(part_ptr, ns, rows, r0, C, c, cm, BLOCK_R)
                cnt = tl.minimum(chunk, S - (r % SPLIT) * chunk).to(tl.float32)
                w = tl.where(valid, cnt[:, None], 0.0)
                tn = tl.maximum(_over_set(tl.sum(w, axis=0), GROUP), 1.0)  # >= 1 but in masked channels
                tmean = _over_set(tl.sum(w * chunk_mean, axis=0), GROUP) / tn
                dev = tl.where(valid, chunk_mean - tmean[None, :], 0.0)
                tm2 = _over_set(tl.sum(chunk_m2 + w * dev * dev, axis=0), GROUP)
                delta = tmean - mean
                new_total = total + tn
                mean += delta * (tn / new_total)
                m2 += tm2 + delta * delta * (total * tn / new_total)
                total = new_total
            var = m2 / count
        else:
            mean = tl.load(rm_ptr + c, mask=cm, other=0.0).to(tl.float32)
            var = tl.load(rv_ptr + c, mask=cm, other=1.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        out = coef_ptr + ns * 4 * C + c
        tl.store(out, rstd * gamma, mask=cm)
        tl.store(out + C, beta, mask=cm)
        tl.store(out + 2 * C, mean, mask=cm)
        tl.store(out + 3 * C, rstd, mask=cm)
        mean_sum += mean
        var_sum += var
    if UPDATE:
        rm = tl.load(rm_ptr + c, mask=cm, other=0.0)
        rv = tl.load(rv_ptr + c, mask=cm, other=0.0)
        new_rm = momentum * (mean_sum / NSETS) + (1.0 - momentum) * rm.to(tl.float32)
        new_rv = momentum * (var_sum * unbias / NSETS) + (1.0 - momentum) * rv.to(tl.float32)
        tl.store(rm_ptr + c, new_rm.to(rm_ptr.dtype.element_ty), mask=cm)
        tl.store(rv_ptr + c, new_rv.to(rv_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _grad_stats_kernel(part_ptr, w_ptr, coef_ptr, gcoef_ptr, dw_ptr, db_ptr, C, NPER, NSETS, SPLIT, CW, cn, count,
                       HAS_W: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                       BATCH_STATS: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """Channels ``[pid * CW, pid * CW + CW)`` of every set: ``gcoef[ns, 0:2, c] = (gb, gd)`` and the weight / bias
    gradients ``sum g xhat`` / ``sum g`` over (n, S), from the backward ``part`` sums (same rows as
    ``_stats_kernel``). With batch statistics ``dx = rstd (h - mean_R h - xhat mean_R(h xhat))``, ``h = gamma g``,
    R the set: ``gb = -rstd^2 mean_R(h xhat)``, ``gd = -rstd mean_R h``."""
    j = tl.arange(0, BLOCK_G)
    c = tl.program_id(0) * CW + j
    cm = (j < CW) & (c < C)
    gamma = tl.load(w_ptr + c, mask=cm, other=1.0).to(tl.float32) if HAS_W else tl.full([BLOCK_G], 1.0, tl.float32)
    rows = NPER * SPLIT
    dw = tl.zeros([BLOCK_G], tl.float32)
    db = tl.zeros([BLOCK_G], tl.float32)
    for ns in range(0, NSETS):
        sg = tl.zeros([BLOCK_G], tl.float32)
        sgx = tl.zeros([BLOCK_G], tl.float32)
        for r0 in range(0, rows, BLOCK_R):
            part_g, part_gx, _, _ = _part_rows(part_ptr, ns, rows, r0, C, c, cm, BLOCK_R)
            sg += tl.sum(part_g, axis=0)
            sgx += tl.sum(part_gx, axis=0)
        rstd = tl.load(coef_ptr + ns * cn + 3 * C + c, mask=cm, other=0.0)
        sgxhat = rstd * sgx
        dw += sgxhat
        db += sg
        if BATCH_STATS:
            mh = _over_set(gamma * sg, GROUP) / count
            mhx = _over_set(gamma * sgxhat, GROUP) / count
            gb = -rstd * rstd * mhx
            gd = -rstd * mh
        else:
            gb = tl.zeros([BLOCK_G], tl.float32)
            gd = tl.zeros([BLOCK_G], tl.float32)
        out = gcoef_ptr + ns * 2 * C + c
        tl.store(out, gb, mask=cm)
        tl.store(out + C, gd, mask=cm)
    if NEED_W:
        tl.store(dw_ptr + c, dw.to(dw_ptr.dtype.element_ty), mask=cm)
    if NEED_B:
        tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _forward_kernel(x_ptr, r_ptr, coef_ptr, y_ptr, C, S, cn, xs_n, xs_c, xs_s, rs_n, rs_c, rs_s,
                    ys_n, ys_c, ys_s, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """``y = relu((x - mean) a + b (+ r))`` in y's dtype."""
    sb, cb, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (c[:, None] < C) & (s[None, :] < S)
    _, z = _pre_activation(x_ptr, r_ptr, coef_ptr, n, c, s, C, cn, xs_n, xs_c, xs_s, rs_n, rs_c, rs_s, mask,
                           HAS_RES)
    if RELU:
        z = tl.maximum(z, 0.0)
    tl.store(y_ptr + n * ys_n + c[:, None] * ys_c + s[None, :] * ys_s, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(x_ptr, r_ptr, dy_ptr, coef_ptr, gcoef_ptr, dx_ptr, dr_ptr, C, S, cn, gn,
                     xs_n, xs_c, xs_s, rs_n, rs_c, rs_s, ds_n, ds_c, ds_s, os_n, os_c, os_s,
                     HAS_RES: tl.constexpr, RELU: tl.constexpr, WRITE_DR: tl.constexpr, ACC_DX: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """``g = dy [z > 0]``; ``dx = a g + gb (x - mean) + gd`` (added to dx's values with ``ACC_DX``); ``dr = g``.
    dx and dr share strides ``os_*``."""
    sb, cb, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    cm = c < C
    mask = cm[:, None] & (s[None, :] < S)
    xm, z = _pre_activation(x_ptr, r_ptr, coef_ptr, n, c, s, C, cn, xs_n, xs_c, xs_s, rs_n, rs_c, rs_s, mask,
                            HAS_RES)
    g = tl.load(dy_ptr + n * ds_n + c[:, None] * ds_c + s[None, :] * ds_s, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        g = tl.where(z > 0, g, 0.0)
    a = tl.load(coef_ptr + n * cn + c, mask=cm, other=0.0)
    gb = tl.load(gcoef_ptr + n * gn + c, mask=cm, other=0.0)
    gd = tl.load(gcoef_ptr + n * gn + C + c, mask=cm, other=0.0)
    dx = a[:, None] * g + gb[:, None] * xm + gd[:, None]
    offs = n * os_n + c[:, None] * os_c + s[None, :] * os_s
    if ACC_DX:
        dx += tl.load(dx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if WRITE_DR:
        tl.store(dr_ptr + offs, g.to(dr_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ launchers
# Repeat launches go straight to the compiled kernels (hmedn_fast.ops.triton.launch): host time matters here.
_REDUCE = FastLauncher(_reduce_kernel)
_STATS = FastLauncher(_stats_kernel)
_GRAD_STATS = FastLauncher(_grad_stats_kernel)
_FORWARD = FastLauncher(_forward_kernel)
_BACKWARD = FastLauncher(_backward_kernel)


def ncs_strides(t: Tensor) -> tuple[int, int, int] | None:
    """(n, c, s) element strides of a (N, C, *spatial) tensor whose spatial axes flatten to one stride (NC* or
    channels-last contiguous, among others, and stride-0 expansions), or None when they do not."""
    s = flat_spatial_stride(t, 2)
    return None if s is None else (t.stride(0), t.stride(1), s)


def flat(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """t, or an NC*-contiguous copy when its spatial axes do not flatten to one stride, and its (n, c, s)
    strides."""
    st = ncs_strides(t)
    if st is None:
        t = t.contiguous()
        st = ncs_strides(t)
    return t, st


class Geometry(NamedTuple):
    """Launch geometry of one (shape, layout, kind) computed once per configuration (:func:`geometry`)."""
    n: int
    c: int
    s: int
    xs: tuple[int, int, int]  # x's (n, c, s) strides
    rs: tuple[int, int, int]  # the residual's, (0, 0, 0) without one
    block_c: int  # channels per program of the reduce and apply kernels
    reduce_grid: tuple[int, int, int]  # (split, channel blocks, N)
    stats_grid: tuple[int]  # programs of the stats kernels
    grid: tuple[int, int, int]  # apply kernels' grid: (S blocks, channel blocks, N)
    split: int  # chunks of S in the reduce pass
    chunk: int  # samples per chunk (a multiple of REDUCE_BLOCK_S)
    nsets: int  # statistics sets along N: N (instance / group with batch statistics) or 1
    nper: int  # samples per set: N or 1
    group: bool  # a set spans cw channels (group norm)
    cw: int  # channels per program of the stats kernels
    block_g: int  # next power of 2 of cw
    block_r: int  # rows (chunks) of part per step of the stats kernels
    count: float  # elements per set
    unbias: float  # count / (count - 1): unbiased variance for the running statistics
    cn: int  # n stride of coef (4C or 0); the backward's gcoef has n stride cn // 2


@functools.lru_cache(maxsize=256)
def geometry(shape: tuple[int, ...], xs: tuple[int, int, int], rs: tuple[int, int, int] | None, kind: str,
             groups: int, batch_stats: bool) -> Geometry:
    """Geometry for x of ``shape`` with (n, c, s) strides ``xs`` (residual ``rs`` or None), ``kind`` in
    batch / instance / group, ``batch_stats`` False when normalising with running statistics."""
    n, c = shape[:2]
    s = 1
    for size in shape[2:]:
        s *= size
    block_c = min(MAX_BLOCK_C, next_power_of_2(c))
    cblocks = cdiv(c, block_c)
    split = max(1, min(cdiv(s, REDUCE_BLOCK_S), TARGET_PROGRAMS // (n * cblocks)))
    chunk = cdiv(cdiv(s, split), REDUCE_BLOCK_S) * REDUCE_BLOCK_S
    split = cdiv(s, chunk)
    per_sample = batch_stats and kind != "batch"
    group = batch_stats and kind == "group"
    nsets, nper = (n, 1) if per_sample else (1, n)
    cw = c // groups if group else min(MAX_STATS_CHANNELS, next_power_of_2(c))
    block_g = next_power_of_2(cw)
    block_r = _stats_block_r(block_g, nper * split)
    count = s * nper * (cw if group else 1)
    return Geometry(n, c, s, xs, rs if rs is not None else (0, 0, 0), block_c, (split, cblocks, n),
                    (cdiv(c, cw),), (cdiv(s, BLOCK_S), cblocks, n), split, chunk, nsets, nper, group,
                    cw, block_g, block_r, float(count), count / max(count - 1, 1), 4 * c if per_sample else 0)


def _stats_block_r(block_g: int, rows: int) -> int:
    """Rows of ``part`` the statistics kernels combine per step: a ``STATS_TILE``-element tile of ``block_g``
    channels, no more rows than there are."""
    return max(1, min(STATS_TILE // block_g, next_power_of_2(rows)))


def forward(geo: Geometry, x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
            running_mean: Tensor | None, running_var: Tensor | None, eps: float, momentum: float, relu: bool,
            batch_stats: bool, update: bool, part: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``y = relu(norm(x) (+ residual))`` and the per-set coefficients ``coef`` (NS, 4, C) float32 the backward
    needs. 3 launches (2 with running statistics). ``update`` updates the running statistics in place.

    Args:
        geo: :func:`geometry` of x and the residual.
        x, residual: (N, C, *spatial) with strides ``geo.xs`` / ``geo.rs``.
        weight, bias: (C,) or None. running_mean, running_var: (C,) or None.
        batch_stats: normalise with the set's statistics (else the running ones).
        part: None, or x's statistics already reduced per chunk (batch norm with batch statistics): float32
            (N, split, 2, C), row (n, r) the mean and M2 of each channel over chunk r of S samples (any partition of
            the S samples into ``split`` chunks of S / split each, e.g. a convolution's output tiles,
            :func:`hmedn_fast.ops.conv_mma.conv3x3_forward`); the reduce pass is skipped.
    Returns:
        y, (N, C, *spatial) in x's layout and dtype (promoted with the residual's, as ``x + residual``); coef.
    """
    coef = torch.empty(geo.nsets, 4, geo.c, device=x.device, dtype=torch.float32)
    split, chunk, block_r = geo.split, geo.chunk, geo.block_r
    if part is not None:
        if not (batch_stats and geo.nsets == 1 and not geo.group and part.dtype == torch.float32
                and part.is_contiguous() and part.ndim == 4 and part.shape[1] >= 1 and geo.s % part.shape[1] == 0
                and (part.shape[0], part.shape[2], part.shape[3]) == (geo.n, 2, geo.c)):
            raise ValueError(f"part must be float32 contiguous (N={geo.n}, split, 2, C={geo.c}) with split dividing "
                             f"S={geo.s}, for a batch norm with batch statistics; got {tuple(part.shape)} "
                             f"{part.dtype}")
        split, chunk = part.shape[1], geo.s // part.shape[1]
        block_r = _stats_block_r(geo.block_g, geo.nper * split)
    elif not batch_stats:
        part = coef  # placeholder: not read with running statistics
    else:
        part = torch.empty(geo.n, geo.split, 2, geo.c, device=x.device, dtype=torch.float32)
        _REDUCE(
            geo.reduce_grid, x, x, x, coef, part, geo.c, geo.s, geo.chunk, geo.split, 0, *geo.xs, 0, 0, 0, 0, 0, 0,
            BACKWARD=False, HAS_RES=False, RELU=False, BLOCK_C=geo.block_c, BLOCK_S=REDUCE_BLOCK_S,
            num_warps=REDUCE_WARPS)
    _STATS(
        geo.stats_grid, part, _or(weight, coef), _or(bias, coef), _or(running_mean, coef), _or(running_var, coef),
        coef, geo.c, geo.s, chunk, split, geo.nper, geo.nsets, geo.cw, geo.count, geo.unbias, float(eps),
        float(momentum), HAS_W=weight is not None, HAS_B=bias is not None, BATCH_STATS=batch_stats, UPDATE=update,
        GROUP=geo.group, BLOCK_R=block_r, BLOCK_G=geo.block_g)
    return apply(geo, x, residual, coef, relu), coef


def apply(geo: Geometry, x: Tensor, residual: Tensor | None, coef: Tensor, relu: bool) -> Tensor:
    """``y = relu(x * scale + shift (+ residual))`` with the coefficients :func:`forward` computed (one launch;
    also replays a forward without reducing again). y is dense in x's layout (x may be a strided view)."""
    mixed = residual is not None and residual.dtype != x.dtype
    dtype = torch.promote_types(x.dtype, residual.dtype) if mixed else x.dtype
    y = _empty_like(x, dtype)
    ys = geo.xs if y.stride() == x.stride() else ncs_strides(y)
    _FORWARD(geo.grid, x, _or(residual, x), coef, y, geo.c, geo.s, geo.cn, *geo.xs, *geo.rs, *ys,
             HAS_RES=residual is not None, RELU=relu, BLOCK_C=geo.block_c, BLOCK_S=BLOCK_S)
    return y


def _empty_like(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``torch.empty_like(x, dtype)`` for NC* or channels-last x; for other strides (a channel slice of a
    channels-last tensor, say) a dense tensor with channels innermost when x's channel stride is 1, else NC*."""
    fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d if x.ndim == 5 else None
    if x.is_contiguous() or fmt is not None and x.is_contiguous(memory_format=fmt):
        return torch.empty_like(x, dtype=dtype)
    return torch.empty(x.shape, device=x.device, dtype=dtype,
                       memory_format=fmt if fmt is not None and x.stride(1) == 1 else torch.contiguous_format)


def backward(geo: Geometry, x: Tensor, residual: Tensor | None, dy: Tensor, weight: Tensor | None, coef: Tensor,
             relu: bool, batch_stats: bool, need_w: bool, bias_dtype: torch.dtype | None, need_r: bool,
             accumulate: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`forward` in 3 launches.

    Args:
        geo, x, residual, weight, relu, batch_stats: as given to :func:`forward`; coef: its output.
        dy: (N, C, *spatial) upstream gradient, any strides.
        need_w, need_r: compute the weight (C,) and residual gradients; bias_dtype: the bias gradient's dtype,
            None when it is not needed.
        accumulate: None, or an (N, C, *spatial) tensor whose spatial axes flatten to one stride (a channel
            slice of a gradient buffer, say) that dx is added to in place, in float32 before one rounding to
            its dtype; it is then returned as dx. Not with ``need_r``.
    Returns:
        dx (x's dtype and layout, or ``accumulate``), dweight, dbias (in weight's / bias's dtype), dresidual (the
        residual's dtype, x's layout); None where not needed.
    """
    if accumulate is not None and (need_r or tuple(accumulate.shape) != tuple(x.shape)
                                   or ncs_strides(accumulate) is None):
        raise ValueError(f"accumulate must have x's shape {tuple(x.shape)} and spatial axes that flatten to one "
                         f"stride, and does not go with need_r; got shape {tuple(accumulate.shape)}, strides "
                         f"{accumulate.stride()}, need_r={need_r}")
    dev = x.device
    part = torch.empty(geo.n, geo.split, 2, geo.c, device=dev, dtype=torch.float32)
    r = _or(residual, x)
    dy, ds = flat(dy)
    _REDUCE(
        geo.reduce_grid, x, r, dy, coef, part, geo.c, geo.s, geo.chunk, geo.split, geo.cn, *geo.xs, *geo.rs, *ds,
        BACKWARD=True, HAS_RES=residual is not None, RELU=relu, BLOCK_C=geo.block_c, BLOCK_S=REDUCE_BLOCK_S,
        num_warps=REDUCE_WARPS)
    gcoef = torch.empty(geo.nsets, 2, geo.c, device=dev, dtype=torch.float32)
    dw = torch.empty(geo.c, device=dev, dtype=weight.dtype) if need_w else None
    db = torch.empty(geo.c, device=dev, dtype=bias_dtype) if bias_dtype is not None else None
    _GRAD_STATS(
        geo.stats_grid, part, _or(weight, coef), coef, gcoef, _or(dw, coef), _or(db, coef), geo.c, geo.nper,
        geo.nsets, geo.split, geo.cw, geo.cn, geo.count, HAS_W=weight is not None, NEED_W=need_w, NEED_B=db is not None,
        BATCH_STATS=batch_stats, GROUP=geo.group, BLOCK_R=geo.block_r, BLOCK_G=geo.block_g)
    dx = _empty_like(x, x.dtype) if accumulate is None else accumulate
    outs = geo.xs if dx.stride() == x.stride() else ncs_strides(dx)
    dr = torch.empty_like(dx, dtype=residual.dtype) if need_r else None
    _BACKWARD(
        geo.grid, x, r, dy, coef, gcoef, dx, _or(dr, dx), geo.c, geo.s, geo.cn, geo.cn // 2, *geo.xs, *geo.rs, *ds,
        *outs, HAS_RES=residual is not None, RELU=relu, WRITE_DR=need_r, ACC_DX=accumulate is not None,
        BLOCK_C=geo.block_c, BLOCK_S=BLOCK_S)
    return dx, dw, db, dr


def _or(t: Tensor | None, other: Tensor) -> Tensor:
    """t, or a placeholder pointer for an argument its kernel does not read (a constexpr flag says so)."""
    return t if t is not None else other
