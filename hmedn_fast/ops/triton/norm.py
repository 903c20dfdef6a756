"""Triton kernels of the fused ``norm (+ residual) + ReLU`` op (:mod:`hmedn_fast.ops.norm_act`).

Every tensor is addressed as a strided ``(N, C, S)`` view, S the flattened spatial size, so one kernel serves
NC* (``strides (C*S, S, 1)``) and channels-last (``(S*C, 1, C)``) layouts, 2D and 3D; Triton specialises
the unit stride, so loads are coalesced along whichever axis is contiguous. Statistics are reduced per
``(n, c)`` (float32 partial sums of deterministic ``SPLIT`` chunks of S, summed by PyTorch); BatchNorm,
InstanceNorm and GroupNorm statistics are then a tiny combination of those ``N x C`` sums.

Passes (each reads the listed tensors once):

- forward ``reduce``: x -> per-(n, c) sum and sum of squares;
- forward ``apply``: x (+ r) -> ``y = relu(x * a + b (+ r))`` with per-(n, c) ``a``, ``b``;
- backward ``reduce``: dy, x (+ r) -> per-(n, c) ``sum g`` and ``sum g x``, ``g = dy * [z > 0]`` with the
  pre-activation ``z`` recomputed from x (+ r), so neither ``z`` nor ``y`` is stored;
- backward ``apply``: dy, x (+ r) -> ``dx = a' g + b' x + d'`` (+ ``dr = g``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_S = 128
MAX_BLOCK_C = 64
TARGET_PROGRAMS = 1024


@triton.jit
def _pre_activation(x_ptr, r_ptr, a_ptr, b_ptr, n, c, s, C, xs_n, xs_c, xs_s, rs_n, rs_c, rs_s, mask,
                    HAS_RES: tl.constexpr):
    """x tile as float32 and ``z = x * a[n, c] + b[n, c] (+ r)`` for a ``[BLOCK_C, BLOCK_S]`` tile."""
    x = tl.load(x_ptr + n * xs_n + c[:, None] * xs_c + s[None, :] * xs_s, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + n * C + c, mask=c < C, other=0.0)
    b = tl.load(b_ptr + n * C + c, mask=c < C, other=0.0)
    z = x * a[:, None] + b[:, None]
    if HAS_RES:
        z += tl.load(r_ptr + n * rs_n + c[:, None] * rs_c + s[None, :] * rs_s, mask=mask, other=0.0).to(tl.float32)
    return x, z


@triton.jit
def _reduce_kernel(x_ptr, r_ptr, dy_ptr, a_ptr, b_ptr, part_ptr, C, S, chunk, SPLIT,
                   xs_n, xs_c, xs_s, rs_n, rs_c, rs_s, ds_n, ds_c, ds_s,
                   BACKWARD: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """part[n, split, 0/1, c] = (sum x, sum x^2) forward, or (sum g, sum g x) backward, over one S chunk."""
    split, cb, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    acc1 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    start = split * chunk
    for s0 in range(start, tl.minimum(start + chunk, S), BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (c[:, None] < C) & (s[None, :] < S)
        if BACKWARD:
            x, z = _pre_activation(x_ptr, r_ptr, a_ptr, b_ptr, n, c, s, C, xs_n, xs_c, xs_s, rs_n, rs_c, rs_s,
                                   mask, HAS_RES)
            g = tl.load(dy_ptr + n * ds_n + c[:, None] * ds_c + s[None, :] * ds_s, mask=mask, other=0.0)
            g = g.to(tl.float32)
            if RELU:
                g = tl.where(z > 0, g, 0.0)
            acc1 += g
            acc2 += g * x
        else:
            x = tl.load(x_ptr + n * xs_n + c[:, None] * xs_c + s[None, :] * xs_s, mask=mask, other=0.0)
            x = x.to(tl.float32)
            acc1 += x
            acc2 += x * x
    out = part_ptr + ((n * SPLIT + split) * 2) * C + c
    tl.store(out, tl.sum(acc1, axis=1), mask=c < C)
    tl.store(out + C, tl.sum(acc2, axis=1), mask=c < C)


@triton.jit
def _forward_kernel(x_ptr, r_ptr, a_ptr, b_ptr, y_ptr, C, S, xs_n, xs_c, xs_s, rs_n, rs_c, rs_s,
                    ys_n, ys_c, ys_s, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """y = relu(x * a[n, c] + b[n, c] (+ r)) in y's dtype."""
    sb, cb, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (c[:, None] < C) & (s[None, :] < S)
    _, z = _pre_activation(x_ptr, r_ptr, a_ptr, b_ptr, n, c, s, C, xs_n, xs_c, xs_s, rs_n, rs_c, rs_s, mask, HAS_RES)
    if RELU:
        z = tl.maximum(z, 0.0)
    tl.store(y_ptr + n * ys_n + c[:, None] * ys_c + s[None, :] * ys_s, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(x_ptr, r_ptr, dy_ptr, a_ptr, b_ptr, ga_ptr, gb_ptr, gd_ptr, dx_ptr, dr_ptr, C, S,
                     xs_n, xs_c, xs_s, rs_n, rs_c, rs_s, ds_n, ds_c, ds_s, os_n, os_c, os_s,
                     HAS_RES: tl.constexpr, RELU: tl.constexpr, WRITE_DR: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """g = dy [z > 0]; dx = ga[n, c] g + gb[n, c] x + gd[n, c]; dr = g. dx and dr share strides ``os_*``."""
    sb, cb, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (c[:, None] < C) & (s[None, :] < S)
    x, z = _pre_activation(x_ptr, r_ptr, a_ptr, b_ptr, n, c, s, C, xs_n, xs_c, xs_s, rs_n, rs_c, rs_s, mask, HAS_RES)
    g = tl.load(dy_ptr + n * ds_n + c[:, None] * ds_c + s[None, :] * ds_s, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        g = tl.where(z > 0, g, 0.0)
    ga = tl.load(ga_ptr + n * C + c, mask=c < C, other=0.0)
    gb = tl.load(gb_ptr + n * C + c, mask=c < C, other=0.0)
    gd = tl.load(gd_ptr + n * C + c, mask=c < C, other=0.0)
    dx = ga[:, None] * g + gb[:, None] * x + gd[:, None]
    offs = n * os_n + c[:, None] * os_c + s[None, :] * os_s
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if WRITE_DR:
        tl.store(dr_ptr + offs, g.to(dr_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers
def ncs_strides(t: Tensor) -> tuple[int, int, int] | None:
    """(n, c, s) element strides of a (N, C, *spatial) tensor whose spatial axes flatten to one stride (NC* or
    channels-last contiguous, among others), or None when they do not."""
    step = 1
    inner = None
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size == 1:
            continue
        if inner is None:
            inner, step = stride, stride * size
        elif stride != step:
            return None
        else:
            step = stride * size
    return t.stride(0), t.stride(1), (inner if inner is not None else 1)


def _blocks(c: int) -> int:
    return min(MAX_BLOCK_C, triton.next_power_of_2(c))


def _dummy(t: Tensor | None, like: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    return (t, ncs_strides(t)) if t is not None else (like, (0, 0, 0))


def reduce_nc(x: Tensor, residual: Tensor | None = None, dy: Tensor | None = None, a: Tensor | None = None,
              b: Tensor | None = None, relu: bool = True) -> tuple[Tensor, Tensor]:
    """Per-(n, c) float32 sums over the spatial axes.

    Forward (``dy is None``): ``(sum x, sum x^2)``. Backward: ``(sum g, sum g x)`` with
    ``g = dy * [x * a + b (+ residual) > 0]`` (``g = dy`` when ``relu=False``). Each result is (N, C).
    """
    n, c = x.shape[:2]
    s = x[0, 0].numel()
    bc = _blocks(c)
    cblocks = triton.cdiv(c, bc)
    split = max(1, min(triton.cdiv(s, BLOCK_S), TARGET_PROGRAMS // (n * cblocks)))
    chunk = triton.cdiv(triton.cdiv(s, split), BLOCK_S) * BLOCK_S
    split = triton.cdiv(s, chunk)
    part = torch.empty(n, split, 2, c, device=x.device, dtype=torch.float32)
    backward = dy is not None
    r, rs = _dummy(residual, x)
    d, ds = _dummy(dy, x)
    coef = a if backward else part
    _reduce_kernel[(split, cblocks, n)](x, r, d, coef, b if backward else part, part, c, s, chunk, split,
                                       *ncs_strides(x), *rs, *ds, BACKWARD=backward,
                                       HAS_RES=residual is not None, RELU=relu, BLOCK_C=bc, BLOCK_S=BLOCK_S)
    total = part.sum(1)
    return total[:, 0], total[:, 1]


def apply_forward(x: Tensor, a: Tensor, b: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
    """``relu(x * a[n, c] + b[n, c] (+ residual))`` in x's dtype and memory layout; a, b float32 (N, C)."""
    n, c = x.shape[:2]
    s = x[0, 0].numel()
    y = torch.empty_like(x)
    r, rs = _dummy(residual, x)
    bc = _blocks(c)
    _forward_kernel[(triton.cdiv(s, BLOCK_S), triton.cdiv(c, bc), n)](
        x, r, a, b, y, c, s, *ncs_strides(x), *rs, *ncs_strides(y), HAS_RES=residual is not None, RELU=relu,
        BLOCK_C=bc, BLOCK_S=BLOCK_S)
    return y


def apply_backward(x: Tensor, residual: Tensor | None, dy: Tensor, a: Tensor, b: Tensor, ga: Tensor, gb: Tensor,
                   gd: Tensor, relu: bool, write_dr: bool) -> tuple[Tensor, Tensor | None]:
    """``dx = ga g + gb x + gd`` and (``write_dr``) ``dr = g``, ``g = dy [x a + b (+ r) > 0]``; x's layout."""
    n, c = x.shape[:2]
    s = x[0, 0].numel()
    dx = torch.empty_like(x)
    dr = torch.empty_like(x) if write_dr else None
    r, rs = _dummy(residual, x)
    bc = _blocks(c)
    _backward_kernel[(triton.cdiv(s, BLOCK_S), triton.cdiv(c, bc), n)](
        x, r, dy, a, b, ga, gb, gd, dx, dr if write_dr else dx, c, s, *ncs_strides(x), *rs, *ncs_strides(dy),
        *ncs_strides(dx), HAS_RES=residual is not None, RELU=relu, WRITE_DR=write_dr, BLOCK_C=bc, BLOCK_S=BLOCK_S)
    return dx, dr
